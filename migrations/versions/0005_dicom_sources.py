"""volumes: DICOM source (format, Study/Series/Frame-of-Reference UIDs, headers key); datasets.label_codes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 01:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('volumes', sa.Column('source_format', sa.String(length=10), server_default='nifti', nullable=False))
    op.add_column('volumes', sa.Column('study_instance_uid', sa.String(length=64), nullable=True))
    op.add_column('volumes', sa.Column('series_instance_uid', sa.String(length=64), nullable=True))
    op.add_column('volumes', sa.Column('frame_of_reference_uid', sa.String(length=64), nullable=True))
    op.add_column('volumes', sa.Column('dicom_key', sa.String(length=500), nullable=True))
    op.add_column('datasets', sa.Column('label_codes', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('datasets', 'label_codes')
    op.drop_column('volumes', 'dicom_key')
    op.drop_column('volumes', 'frame_of_reference_uid')
    op.drop_column('volumes', 'series_instance_uid')
    op.drop_column('volumes', 'study_instance_uid')
    op.drop_column('volumes', 'source_format')
