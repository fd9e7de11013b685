from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, TimestampMixin
from app.jobs.states import JobMixin


class Segmentation(TimestampMixin, JobMixin, Base):
    """A SAM run over one volume's prompts; ``mask_key`` is set only once the mask is complete."""

    __tablename__ = "segmentations"

    id: Mapped[int] = mapped_column(primary_key=True)
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(50))
    fusion: Mapped[str] = mapped_column(String(20))
    labels: Mapped[list[str] | None] = mapped_column(JSONB, default=None)
    fill_gaps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    mask_key: Mapped[str | None] = mapped_column(String(500), default=None)
    mask_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    stats: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)

    def job_params(self) -> dict[str, Any]:
        return {"model": self.model, "fusion": self.fusion, "labels": self.labels, "fill_gaps": self.fill_gaps}
