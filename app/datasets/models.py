from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import Boolean, Enum, Float, ForeignKey, String, false
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
    tasks_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    @property
    def window(self) -> dict[str, Any]:
        return {"level": self.window_level, "width": self.window_width}


class MemberRole(enum.StrEnum):
    owner = "owner"  # a researcher who manages the dataset
    annotator = "annotator"  # may label it


class DatasetMember(TimestampMixin, Base):
    """Who may see and work on a dataset (admins may everything without a row)."""

    __tablename__ = "dataset_members"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"), primary_key=True,
                                          index=True)
    role: Mapped[MemberRole] = mapped_column(Enum(MemberRole, name="member_role", native_enum=False, length=20))
