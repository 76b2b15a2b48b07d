"""The audit log: one appended row per change (base add/rm, push, rm, tag, untag, policies, gc, repair).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.String(length=256), nullable=False),
        sa.Column('action', sa.String(length=32), nullable=False),
        sa.Column('subject', sa.String(length=128), nullable=True),
        sa.Column('revision', sa.Integer(), nullable=True),
        sa.Column('base', sa.String(length=128), nullable=True),
        sa.Column('details', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_events')),
    )
    op.create_index(op.f('ix_events_at'), 'events', ['at'], unique=False)
    op.create_index(op.f('ix_events_subject'), 'events', ['subject'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_events_subject'), table_name='events')
    op.drop_index(op.f('ix_events_at'), table_name='events')
    op.drop_table('events')
