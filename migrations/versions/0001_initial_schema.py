"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('n_tensors', sa.Integer(), nullable=False),
    sa.Column('n_params', sa.BigInteger(), nullable=False),
    sa.Column('nbytes', sa.BigInteger(), nullable=False),
    sa.Column('layout', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bases')),
    sa.UniqueConstraint('digest', name=op.f('uq_bases_digest')),
    sa.UniqueConstraint('name', name=op.f('uq_bases_name'))
    )
    op.create_table('blobs',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('raw_size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_blobs'))
    )
    op.create_table('subjects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('latest', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subjects')),
    sa.UniqueConstraint('name', name=op.f('uq_subjects_name'))
    )
    op.create_table('base_tensors',
    sa.Column('base_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('shape', sa.String(length=128), nullable=False),
    sa.Column('tensor_digest', sa.String(length=64), nullable=False),
    sa.Column('blob_digest', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['base_id'], ['bases.id'], name=op.f('fk_base_tensors_base_id_bases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['blob_digest'], ['blobs.digest'], name=op.f('fk_base_tensors_blob_digest_blobs')),
    sa.PrimaryKeyConstraint('base_id', 'position', name=op.f('pk_base_tensors')),
    sa.UniqueConstraint('base_id', 'key', name=op.f('uq_base_tensors_base_id_key'))
    )
    with op.batch_alter_table('base_tensors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_tensors_blob_digest'), ['blob_digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_base_tensors_tensor_digest'), ['tensor_digest'], unique=False)

    op.create_table('revisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('base_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('energy', sa.Float(), nullable=True),
    sa.Column('factor_dtype', sa.String(length=16), nullable=False),
    sa.Column('original_bytes', sa.BigInteger(), nullable=False),
    sa.Column('stored_bytes', sa.BigInteger(), nullable=False),
    sa.Column('kept_params', sa.BigInteger(), nullable=False),
    sa.Column('n_tensors', sa.Integer(), nullable=False),
    sa.Column('n_changed', sa.Integer(), nullable=False),
    sa.Column('source_digest', sa.String(length=64), nullable=False),
    sa.Column('source_format', sa.String(length=16), nullable=False),
    sa.Column('layout', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['base_id'], ['bases.id'], name=op.f('fk_revisions_base_id_bases')),
    sa.ForeignKeyConstraint(['subject_id'], ['subjects.id'], name=op.f('fk_revisions_subject_id_subjects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_revisions')),
    sa.UniqueConstraint('subject_id', 'number', name=op.f('uq_revisions_subject_id_number'))
    )
    with op.batch_alter_table('revisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revisions_base_id'), ['base_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_revisions_created_at'), ['created_at'], unique=False)

    op.create_table('entries',
    sa.Column('revision_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('shape', sa.String(length=128), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('full_rank', sa.Integer(), nullable=True),
    sa.Column('rel_error', sa.Float(), nullable=False),
    sa.Column('tensor_digest', sa.String(length=64), nullable=False),
    sa.Column('blob_digest', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['blob_digest'], ['blobs.digest'], name=op.f('fk_entries_blob_digest_blobs')),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], name=op.f('fk_entries_revision_id_revisions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('revision_id', 'position', name=op.f('pk_entries'))
    )
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_entries_blob_digest'), ['blob_digest'], unique=False)

    op.create_table('tags',
    sa.Column('subject_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('revision_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], name=op.f('fk_tags_revision_id_revisions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['subject_id'], ['subjects.id'], name=op.f('fk_tags_subject_id_subjects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('subject_id', 'name', name=op.f('pk_tags'))
    )
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tags_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_tags_revision_id'), ['revision_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tags_revision_id'))
        batch_op.drop_index(batch_op.f('ix_tags_name'))

    op.drop_table('tags')
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_entries_blob_digest'))

    op.drop_table('entries')
    with op.batch_alter_table('revisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_revisions_created_at'))
        batch_op.drop_index(batch_op.f('ix_revisions_base_id'))

    op.drop_table('revisions')
    with op.batch_alter_table('base_tensors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_tensors_tensor_digest'))
        batch_op.drop_index(batch_op.f('ix_base_tensors_blob_digest'))

    op.drop_table('base_tensors')
    op.drop_table('subjects')
    op.drop_table('blobs')
    op.drop_table('bases')
