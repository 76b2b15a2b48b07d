"""Rank rules (energy, max-error, budget, exact) and factor encodings per revision and entry.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('revisions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rank_rule', sa.String(length=64), nullable=True))
        batch_op.alter_column('factor_dtype', new_column_name='encoding', existing_type=sa.String(length=16), existing_nullable=False)
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('encoding', sa.String(length=16), nullable=True))

    # Every earlier revision was ranked by the energy rule, its factors and dense deltas in the
    # revision's factor dtype.
    revisions = sa.table('revisions', sa.column('id'), sa.column('energy', sa.Float), sa.column('rank_rule'), sa.column('encoding'))
    conn = op.get_bind()
    for rid, energy in conn.execute(sa.select(revisions.c.id, revisions.c.energy)).all():
        rule = "energy=0.5" if energy is None else f"energy={energy:g}"
        conn.execute(revisions.update().where(revisions.c.id == rid).values(rank_rule=rule))
    op.execute(
        "UPDATE entries SET encoding = (SELECT revisions.encoding FROM revisions WHERE revisions.id = entries.revision_id) "
        "WHERE kind IN ('lowrank', 'dense')"
    )
    with op.batch_alter_table('revisions', schema=None) as batch_op:
        batch_op.alter_column('rank_rule', existing_type=sa.String(length=64), nullable=False)


def downgrade() -> None:
    # The older schema cannot describe revisions stored with the newer rules, kinds or encodings:
    # refuse rather than drop them.
    newer = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM revisions WHERE rank_rule NOT LIKE 'energy=%' OR encoding NOT IN ('fp16', 'bf16', 'fp32') "
        "OR id IN (SELECT revision_id FROM entries WHERE kind NOT IN ('base', 'lowrank', 'dense', 'full'))"
    )).scalar()
    if newer:
        raise RuntimeError(f"{newer} revisions use rank rules, kinds or encodings that revision 0003 cannot hold; remove them first")
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.drop_column('encoding')
    with op.batch_alter_table('revisions', schema=None) as batch_op:
        batch_op.alter_column('encoding', new_column_name='factor_dtype', existing_type=sa.String(length=16), existing_nullable=False)
        batch_op.drop_column('rank_rule')
