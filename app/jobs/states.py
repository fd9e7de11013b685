"""Job states and the columns every job row shares (segmentations, exports, evaluations, any later kind).

    queued ──▶ running ──▶ finished
      ▲  │        │  └───▶ failed      (permanent error, or no retries left; ``error`` says why)
      │  │        │  └───▶ canceled    (cancel requested; the job stops at its next progress tick)
      │  └──▶ canceled                (canceled before it started)
      └────────── running            (transient error or dead worker with retries left: ``attempts`` counts)

A row in ``failed``, ``finished`` or ``canceled`` never changes again: RQ is told not to retry a
permanent failure, and a transient one is ``queued`` (not ``failed``) while a retry is pending.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import DateTime, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    finished = "finished"
    failed = "failed"
    canceled = "canceled"


TERMINAL = frozenset({JobStatus.finished, JobStatus.failed, JobStatus.canceled})


class JobMixin:
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued, index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    rq_job_id: Mapped[str | None] = mapped_column(String(100), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    def job_params(self) -> dict[str, Any]:
        """The parameters the job runs with (validated by the kind's pydantic model)."""
        return dict(getattr(self, "params", None) or {})


class DatasetJobOut(BaseModel):
    """Fields every dataset-level job (export, evaluation) shows in the API."""

    id: int
    dataset_id: int
    status: str
    params: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    attempts: int
    cancel_requested: bool = False
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
