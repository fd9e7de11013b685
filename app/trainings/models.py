from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, TimestampMixin
from app.jobs.states import JobMixin


class Training(TimestampMixin, JobMixin, Base):
    """An nnU-Net v2 training on one export of a dataset, with its checkpoint and test-split predictions."""

    __tablename__ = "trainings"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    # The export trained on; NULL once that export is deleted (its id stays in ``params``).
    export_id: Mapped[int | None] = mapped_column(ForeignKey("exports.id", ondelete="SET NULL"), index=True,
                                                  default=None)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB, default=None)
    model_key: Mapped[str | None] = mapped_column(String(500), default=None)  # model.tar.gz
    predictions_key: Mapped[str | None] = mapped_column(String(500), default=None)  # predictions.tar.gz
