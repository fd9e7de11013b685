"""segmentations.fill_gaps: derived boxes on unknown slices in gaps of at most N slices (0 = off)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 19:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('segmentations', sa.Column('fill_gaps', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('segmentations', 'fill_gaps')
