from __future__ import annotations

from typing import Any

from sqlalchemy import Float, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, TimestampMixin


class Dataset(TimestampMixin, Base):
    """A labelled collection of volumes: label schema, YOLO class map and default CT window."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    labels: Mapped[dict[str, int]] = mapped_column(JSONB)
    prompt_classes: Mapped[dict[str, str] | None] = mapped_column(JSONB, default=None)
    window_level: Mapped[float] = mapped_column(Float)
    window_width: Mapped[float] = mapped_column(Float)

    @property
    def window(self) -> dict[str, Any]:
        return {"level": self.window_level, "width": self.window_width}
