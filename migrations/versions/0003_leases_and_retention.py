"""Upload leases, retention policies, and a revision counter that removals never lower.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('leases',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('holder', sa.String(length=256), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_leases'))
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_leases_expires_at'), ['expires_at'], unique=False)

    op.create_table('policies',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('pattern', sa.String(length=256), nullable=False),
    sa.Column('keep_last', sa.Integer(), nullable=True),
    sa.Column('max_age_seconds', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_policies'))
    )
    op.create_table('lease_blobs',
    sa.Column('lease_id', sa.String(length=32), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['lease_id'], ['leases.id'], name=op.f('fk_lease_blobs_lease_id_leases'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('lease_id', 'digest', name=op.f('pk_lease_blobs'))
    )
    with op.batch_alter_table('lease_blobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lease_blobs_digest'), ['digest'], unique=False)

    with op.batch_alter_table('subjects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('counter', sa.Integer(), server_default='0', nullable=False))
    # Until now no revision was ever removed, so the numbers handed out are exactly the latest.
    op.execute("UPDATE subjects SET counter = latest")



def downgrade() -> None:
    with op.batch_alter_table('subjects', schema=None) as batch_op:
        batch_op.drop_column('counter')

    with op.batch_alter_table('lease_blobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lease_blobs_digest'))

    op.drop_table('lease_blobs')
    op.drop_table('policies')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_leases_expires_at'))

    op.drop_table('leases')
