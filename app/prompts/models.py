from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, TimestampMixin


class Prompt(TimestampMixin, Base):
    """One crowd prompt on display slice ``slice_index``: a box ``[x0, y0, x1, y1]`` or a point."""

    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("annotator", "client_id", name="uq_prompts_annotator_client_id"),
        Index("ix_prompts_volume_slice", "volume_id", "slice_index"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"))
    slice_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(200))
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id", ondelete="SET NULL"), default=None)
    kind: Mapped[str] = mapped_column(String(10))
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float | None] = mapped_column(Float, default=None)
    y1: Mapped[float | None] = mapped_column(Float, default=None)
    positive: Mapped[bool | None] = mapped_column(Boolean, default=None)
    source: Mapped[str] = mapped_column(String(20))
    client_id: Mapped[uuid.UUID | None] = mapped_column(default=None)


class SliceView(TimestampMixin, Base):
    """An annotator has seen a slice (whether or not they drew anything): coverage and task state."""

    __tablename__ = "slice_views"
    __table_args__ = (
        UniqueConstraint("volume_id", "slice_index", "annotator", name="uq_slice_views_volume_slice_annotator"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"))
    slice_index: Mapped[int] = mapped_column(Integer)
    annotator: Mapped[str] = mapped_column(String(200), index=True)
    source: Mapped[str] = mapped_column(String(20))
