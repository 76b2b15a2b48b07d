"""Derived blobs of base tensors (the SVD that SVDiff subjects' spectral shifts apply to).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'derived',
        sa.Column('tensor_digest', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('blob_digest', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['blob_digest'], ['blobs.digest'], name=op.f('fk_derived_blob_digest_blobs')),
        sa.PrimaryKeyConstraint('tensor_digest', 'kind', name=op.f('pk_derived')),
    )
    op.create_index(op.f('ix_derived_blob_digest'), 'derived', ['blob_digest'], unique=False)


def downgrade() -> None:
    # The older schema has no place for the SVD that spectral entries are rebuilt with: refuse
    # rather than leave revisions that cannot be checked out.
    spectral = op.get_bind().execute(sa.text("SELECT count(*) FROM entries WHERE kind = 'spectral'")).scalar()
    if spectral:
        raise RuntimeError(f"{spectral} entries are SVDiff spectral shifts, which revision 0004 cannot rebuild; remove their revisions first")
    op.drop_index(op.f('ix_derived_blob_digest'), table_name='derived')
    op.drop_table('derived')
