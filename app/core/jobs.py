"""Columns shared by every job row (segmentations, exports, evaluations)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import DateTime, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.core.errors import ServiceUnavailable


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    finished = "finished"
    failed = "failed"
    canceled = "canceled"


class JobMixin:
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued, index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    rq_job_id: Mapped[str | None] = mapped_column(String(100), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


def commit_and_enqueue(session: Session, rows: Sequence[JobMixin], enqueue: Callable[[], None]) -> None:
    """Commit job rows first (the worker must find them), then enqueue.

    When the queue is unreachable the rows are marked failed with the reason and the caller gets 503.
    """
    session.commit()
    try:
        enqueue()
    except Exception as exc:
        for row in rows:
            row.status = JobStatus.failed
            row.error = f"could not enqueue the job: {exc}"
        session.commit()
        raise ServiceUnavailable("the job queue is unavailable; the request was recorded as failed") from exc


class DatasetJobOut(BaseModel):
    """Fields every dataset-level job (export, evaluation) shows in the API."""

    id: int
    dataset_id: int
    status: str
    params: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
