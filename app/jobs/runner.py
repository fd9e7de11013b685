"""Running a job of any kind: the row's transitions, progress, cancel, retries and dead workers.

``run_job(kind, row_id, handler)`` is the whole lifecycle of one attempt:

- the row is locked and marked ``running`` (``attempts`` + 1); a finished or canceled row is
  skipped (a duplicate delivery or a cancel that raced the start);
- the kind's typed parameters are validated again (a row written by an older version that no
  longer validates fails permanently, with pydantic's message);
- ``handler(context)`` does the work and returns the row's result columns; it reports progress
  through ``context.progress(done, total)``, which also stops it when a cancel was requested;
- the result columns and ``finished`` are written in one commit, after every file is stored.

Errors: :data:`PERMANENT_ERRORS` (bad data, configuration, timeouts) → ``failed`` with the reason
and RQ is told not to retry; anything else (I/O, database, Redis, memory) → ``queued`` with the
attempt count and the reason while RQ retries with backoff, ``failed`` when no retry is left.
A worker that dies mid-job is noticed by RQ's started-job registry (see :mod:`app.jobs.reconcile`
and ``workers.run``); :func:`job_failed` (the RQ failure callback) then updates the row the same way.

Metrics: every attempt's outcome (finished, failed, canceled, retrying, abandoned) and run time, and what
the handler added to ``context.metrics``, go to Redis in one pipeline at its end (:mod:`app.core.metrics`,
best effort); log records inside carry the job id and kind (:mod:`app.core.logs`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from redis import Redis
from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException
from sqlalchemy import update

import app.models  # every table is known, so a job's flush can resolve its foreign keys
from app.core.db import session_scope
from app.core.errors import CrowdsamError, PermanentJobError
from app.core.jsonsafe import json_safe
from app.core.logs import job_context
from app.core.metrics import JobMetrics
from app.core.storage import Storage, get_storage
from app.jobs.kinds import JobKind, get_kind, parse_job_id
from app.jobs.states import JobStatus
from app.jobs.submit import cancel_requested

log = logging.getLogger("crowdsam.jobs")

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    CrowdsamError, PermanentJobError, ValidationError, LookupError, ValueError, TypeError, AssertionError,
    JobTimeoutException,
)
DEFAULT_PROGRESS_INTERVAL_S = 1.0


class Canceled(Exception):
    """Raised from a progress tick when a cancel was requested: the handler stops where it is."""


@dataclass
class JobContext:
    """What a handler gets: its row id, typed parameters, the store and a progress/cancel callback."""

    kind: JobKind
    row_id: int
    params: Any  # the kind's pydantic model
    storage: Storage
    min_interval: float = DEFAULT_PROGRESS_INTERVAL_S
    metrics: JobMetrics = field(default_factory=JobMetrics)  # the handler's numbers, flushed with the outcome
    _last_write: float = field(default=float("-inf"), repr=False)

    def check_cancel(self) -> None:
        if cancel_requested(self.kind, self.row_id):
            raise Canceled(f"{self.kind.name} {self.row_id} was canceled")

    def progress(self, done: int, total: int, **extra: Any) -> None:
        """Check for a cancel; write ``{"done", "total"}`` at most every ``min_interval`` s (always the last)."""
        self.check_cancel()
        now = time.monotonic()
        if done < total and now - self._last_write < self.min_interval:
            return
        model = self.kind.model
        with session_scope() as session:
            session.execute(
                update(model)
                .where(model.id == self.row_id, model.status == JobStatus.running)
                .values(progress=json_safe({"done": int(done), "total": int(total), **extra}))
            )
            session.commit()
        self._last_write = now


Handler = Callable[[JobContext], dict[str, Any]]


def row_and_dataset(session: Any, context: JobContext) -> tuple[Any, Any]:
    """A dataset-level job's row and its dataset (``LookupError`` once the dataset was deleted)."""
    row = session.get(context.kind.model, context.row_id)
    dataset = session.get(app.models.Dataset, row.dataset_id) if row is not None else None
    if row is None or dataset is None:
        raise LookupError(f"{context.kind.job_id(context.row_id)}: its row or dataset was deleted")
    return row, dataset


def run_job(kind_name: str, row_id: int, handler: Handler, *, storage: Storage | None = None) -> dict[str, Any]:
    """Run one attempt of the job on row ``row_id`` (see the module docstring)."""
    kind = get_kind(kind_name)
    with job_context(kind.job_id(row_id), kind.name):
        return _run(kind, row_id, handler, storage)


def _run(kind: JobKind, row_id: int, handler: Handler, storage: Storage | None) -> dict[str, Any]:
    if not _start(kind, row_id):
        return {"job": kind.job_id(row_id), "status": "skipped"}
    started = time.perf_counter()
    metrics, outcome = JobMetrics(), "failed"
    try:
        params = kind.validated_params(_row_snapshot(kind, row_id))
        context = JobContext(kind, row_id, params, storage or get_storage(), metrics=metrics)
        context.check_cancel()
        values = handler(context)
        context.check_cancel()
        _set(kind, row_id, status=JobStatus.finished, error=None, finished_at=_now(), **json_safe(values))
        outcome = "finished"
    except Canceled:
        _set(kind, row_id, status=JobStatus.canceled, error="canceled while running", finished_at=_now())
        outcome = "canceled"
        return {"job": kind.job_id(row_id), "status": "canceled"}
    except PERMANENT_ERRORS as exc:
        _set(kind, row_id, status=JobStatus.failed, error=reason(exc), finished_at=_now())
        _no_more_retries()
        raise
    except BaseException as exc:
        outcome = _transient_failure(kind, row_id, exc)
        raise
    finally:
        seconds = time.perf_counter() - started
        metrics.inc("crowdsam_jobs", kind=kind.name, outcome=outcome)
        metrics.observe("crowdsam_job_duration_seconds", seconds, kind=kind.name, outcome=outcome)
        metrics.flush()
    log.info("%s finished in %.1f s", kind.job_id(row_id), seconds)
    return {"job": kind.job_id(row_id), "status": "finished"}


def _now() -> datetime:
    return datetime.now(UTC)


def _start(kind: JobKind, row_id: int) -> bool:
    with session_scope() as session:
        row = session.get(kind.model, row_id, with_for_update=True)
        if row is None:
            log.warning("%s: the row is gone (deleted); nothing to do", kind.job_id(row_id))
            return False
        if row.status in (JobStatus.finished, JobStatus.canceled):
            log.info("%s is already %s; nothing to do", kind.job_id(row_id), row.status)
            return False
        row.status = JobStatus.running
        row.attempts = (row.attempts or 0) + 1
        row.started_at = _now()
        row.finished_at = None
        row.error = None
        session.commit()
    return True


def _row_snapshot(kind: JobKind, row_id: int) -> Any:
    with session_scope() as session:
        row = session.get(kind.model, row_id)
        if row is None:
            raise LookupError(f"{kind.job_id(row_id)}: the row was deleted while the job ran")
        session.expunge(row)
        return row


def _set(kind: JobKind, row_id: int, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(kind.model).where(kind.model.id == row_id).values(**values))
        session.commit()


def _transient_failure(kind: JobKind, row_id: int, exc: BaseException) -> str:
    """Requeue the row while RQ will retry (returns ``"retrying"``), else fail it (``"failed"``)."""
    job = get_current_job()
    left = int(job.retries_left or 0) if job is not None else 0
    if job is not None and left > 0:
        message = f"attempt failed ({reason(exc)}); retrying in {job.get_retry_interval()} s ({left} retries left)"
        _set(kind, row_id, status=JobStatus.queued, error=message)
        log.warning("%s: %s", kind.job_id(row_id), message)
        return "retrying"
    _set(kind, row_id, status=JobStatus.failed, error=reason(exc), finished_at=_now())
    log.error("%s failed: %s", kind.job_id(row_id), reason(exc), exc_info=exc)
    return "failed"


def _no_more_retries() -> None:
    """Retrying cannot fix a data or configuration problem: tell RQ not to."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0


def reason(exc: BaseException) -> str:
    if isinstance(exc, JobTimeoutException):
        return f"timed out: {exc}"
    if isinstance(exc, CrowdsamError):
        return str(exc.detail)
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:4000]


def mark_abandoned(kind: JobKind, row_id: int, *, retrying: bool) -> None:
    """The worker running this job died (SIGKILL, OOM, lost host); RQ retries it or gave up."""
    with session_scope() as session:
        row = session.get(kind.model, row_id, with_for_update=True)
        if row is None or row.status in (JobStatus.finished, JobStatus.canceled, JobStatus.failed):
            return
        if retrying:
            row.status = JobStatus.queued
            row.error = "the worker running this job died; it was handed back for a retry"
        else:
            row.status = JobStatus.failed
            row.error = "the worker running this job died and no retries are left"
            row.finished_at = _now()
        session.commit()
    log.warning("%s was abandoned by a dead worker: %s", kind.job_id(row_id), "retrying" if retrying else "failed")
    metrics = JobMetrics()
    metrics.inc("crowdsam_jobs", kind=kind.name, outcome="abandoned")
    metrics.flush()


def job_failed(job: Job, connection: Redis, exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """RQ failure callback (every job we enqueue has it): the row of an abandoned job follows RQ's decision.

    Failures raised inside :func:`run_job` already updated the row; only a dead worker's job
    (``AbandonedJobError``, from RQ's started-job registry cleanup) needs it here.
    """
    if not isinstance(exc, AbandonedJobError) and exc_type is not AbandonedJobError:
        return
    parsed = parse_job_id(job.id)
    if parsed is not None:
        kind, row_id = parsed
        mark_abandoned(kind, row_id, retrying=bool(job.retries_left and job.retries_left > 0))


def params_model(context: JobContext, model: type[BaseModel]) -> Any:
    """The context's parameters as ``model`` (a handler's typed view; asserts the kind matches)."""
    assert isinstance(context.params, model), f"{context.kind.name} parameters are {type(context.params)}"
    return context.params
