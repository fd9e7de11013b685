from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import Boolean, Enum, Float, ForeignKey, Integer, String, false
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.core.config import get_settings
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
    # Task assignment (app.tasks); NULL = the service's default (CROWDSAM_TASK_*).
    task_min_views: Mapped[int | None] = mapped_column(Integer, default=None)
    task_max_views: Mapped[int | None] = mapped_column(Integer, default=None)
    task_min_agreement: Mapped[float | None] = mapped_column(Float, default=None)
    task_gold_rate: Mapped[float | None] = mapped_column(Float, default=None)
    label_codes: Mapped[dict[str, Any] | None] = mapped_column(JSONB, default=None)  # coded concepts per label

    @property
    def window(self) -> dict[str, Any]:
        return {"level": self.window_level, "width": self.window_width}

    @property
    def tasks(self) -> dict[str, Any]:
        """The task policy in force: the dataset's own values, else the service's defaults."""
        defaults = get_settings()
        min_views = self.task_min_views or defaults.task_min_views
        agreement, gold = self.task_min_agreement, self.task_gold_rate
        return {
            "min_views": min_views,
            "max_views": max(min_views, self.task_max_views or defaults.task_max_views),
            "min_agreement": defaults.task_min_agreement if agreement is None else agreement,
            "gold_rate": defaults.task_gold_rate if gold is None else gold,
        }


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
