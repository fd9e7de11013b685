from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, TimestampMixin
from app.jobs.states import JobMixin


class Export(TimestampMixin, JobMixin, Base):
    """An nnU-Net v2 raw dataset written from a dataset's volumes and labels."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(20))
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB, default=None)
    archive_key: Mapped[str | None] = mapped_column(String(500), default=None)
