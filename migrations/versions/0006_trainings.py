"""trainings: nnU-Net training jobs on an export (checkpoint and predictions archives)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 04:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('trainings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('export_id', sa.Integer(), nullable=True),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('model_key', sa.String(length=500), nullable=True),
    sa.Column('predictions_key', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('progress', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('rq_job_id', sa.String(length=100), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_trainings_dataset_id_datasets'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['export_id'], ['exports.id'], name=op.f('fk_trainings_export_id_exports'),
                            ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trainings'))
    )
    op.create_index(op.f('ix_trainings_dataset_id'), 'trainings', ['dataset_id'], unique=False)
    op.create_index(op.f('ix_trainings_export_id'), 'trainings', ['export_id'], unique=False)
    op.create_index(op.f('ix_trainings_status'), 'trainings', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_trainings_status'), table_name='trainings')
    op.drop_index(op.f('ix_trainings_export_id'), table_name='trainings')
    op.drop_index(op.f('ix_trainings_dataset_id'), table_name='trainings')
    op.drop_table('trainings')
