"""dataset task policy: min/max views per slice, agreement threshold, gold rate

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 19:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL = the service's default (CROWDSAM_TASK_*), so existing datasets keep what they had.
    op.add_column('datasets', sa.Column('task_min_views', sa.Integer(), nullable=True))
    op.add_column('datasets', sa.Column('task_max_views', sa.Integer(), nullable=True))
    op.add_column('datasets', sa.Column('task_min_agreement', sa.Float(), nullable=True))
    op.add_column('datasets', sa.Column('task_gold_rate', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('datasets', 'task_gold_rate')
    op.drop_column('datasets', 'task_min_agreement')
    op.drop_column('datasets', 'task_max_views')
    op.drop_column('datasets', 'task_min_views')
