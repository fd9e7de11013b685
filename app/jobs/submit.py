"""Submitting and canceling jobs from a request (or any session): rows first, queue after the commit.

``submit`` validates the rows' parameters and remembers them on the session. When the session
commits, the queue is checked first (Redis down → the commit is refused with 503 and no row
exists), then the rows commit, then their jobs are enqueued. If enqueueing fails after the
commit the rows stay ``queued`` and the reconciler (:mod:`app.jobs.reconcile`) enqueues them:
a 202 always means the job will run. Routers never commit themselves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from redis.exceptions import RedisError
from rq import Callback, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from sqlalchemy import event, func, select, union_all
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.db import on_commit
from app.core.errors import Conflict, NotFound, ServiceUnavailable, TooManyRequests
from app.core.redis import get_queue, get_redis
from app.core.storage import get_storage
from app.jobs.kinds import JobKind, all_kinds
from app.jobs.states import TERMINAL, JobMixin, JobStatus

log = logging.getLogger("crowdsam.jobs")

PENDING = "crowdsam_jobs_to_enqueue"
CANCEL_FLAG_TTL_S = 7 * 24 * 3600
FAILURE_CALLBACK = "app.jobs.runner.job_failed"
CAP_RETRY_AFTER_S = 60
ACTIVE = (JobStatus.queued, JobStatus.running)


def submit(session: Session, kind: JobKind, rows: Sequence[JobMixin]) -> None:
    """Validate the rows' parameters and enqueue their jobs once ``session`` commits (rows must be flushed)."""
    _within_cap(session, rows)
    for row in rows:
        kind.validated_params(row)
        row.rq_job_id = kind.job_id(row.id)  # type: ignore[attr-defined]
    session.info.setdefault(PENDING, []).extend((kind, row.id, kind.describe(row)) for row in rows)  # type: ignore[attr-defined]


def _within_cap(session: Session, rows: Sequence[JobMixin]) -> None:
    """At most ``max_active_jobs_per_user`` queued + running rows of every kind per creator, new rows included.

    A transaction-scoped advisory lock per creator makes the count exact under concurrent requests:
    a second request of the same creator waits for the first to commit, then counts its rows too."""
    for creator in sorted({row.created_by for row in rows}):
        session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended("crowdsam-jobs:" + creator, 0))))
        counts = union_all(*(
            select(func.count()).select_from(k.model).where(k.model.created_by == creator, k.model.status.in_(ACTIVE))
            for k in all_kinds()
        )).subquery()
        active = int(session.scalar(select(func.coalesce(func.sum(counts.c[0]), 0))) or 0)
        limit = get_settings().max_active_jobs_per_user
        if active > limit:
            new = sum(1 for row in rows if row.created_by == creator)
            raise TooManyRequests(
                f"{creator!r} has {active - new} queued or running jobs and this request adds {new}: at most "
                f"{limit} may be active at once (CROWDSAM_MAX_ACTIVE_JOBS_PER_USER); wait for some to finish "
                "or cancel some", headers={"Retry-After": str(CAP_RETRY_AFTER_S)})


def enqueue(kind: JobKind, row_id: int, description: str) -> None:
    """Put a committed row's job on its queue (same id every time: RQ keeps one job per row)."""
    intervals = list(kind.retry_intervals)
    get_queue(kind.queue).enqueue(
        kind.entry,
        row_id,
        job_id=kind.job_id(row_id),
        job_timeout=kind.job_timeout(),  # CROWDSAM_JOB_TIMEOUT_S, or the kind's own (trainings: hours)
        retry=Retry(max=len(intervals), interval=intervals) if intervals else None,
        on_failure=Callback(FAILURE_CALLBACK),
        result_ttl=24 * 3600,
        failure_ttl=7 * 24 * 3600,
        description=description,
    )


@event.listens_for(Session, "before_commit")
def _queue_must_be_reachable(session: Session) -> None:
    if session.info.get(PENDING):
        try:
            get_redis().ping()
        except RedisError as exc:
            raise ServiceUnavailable("the job queue is unavailable; nothing was recorded, try again later") from exc


@event.listens_for(Session, "after_commit")
def _enqueue_committed(session: Session) -> None:
    for kind, row_id, description in session.info.pop(PENDING, []):
        try:
            enqueue(kind, row_id, description)
        except RedisError:
            log.warning("%s stays queued: enqueueing failed after its commit; the reconciler will enqueue it",
                        kind.job_id(row_id), exc_info=True)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(PENDING, None)


def cancel_requested(kind: JobKind, row_id: int) -> bool:
    return bool(get_redis().exists(kind.cancel_key(row_id)))


def stopping(kind: JobKind, row: Any) -> bool:
    """A running job asked to stop (a queued one is canceled at once, so only running ones can be stopping)."""
    return bool(row.status == JobStatus.running and cancel_requested(kind, row.id))


def cancel(session: Session, kind: JobKind, row_id: int) -> Any:
    """Queued → canceled now (its queue entry is dropped); running → the job stops at its next progress tick."""
    row = session.get(kind.model, row_id, with_for_update=True)
    if row is None:
        raise NotFound(f"{kind.name} {row_id} not found")
    if row.status in TERMINAL:
        raise Conflict(f"{kind.name} {row.id} is already {row.status}")
    get_redis().set(kind.cancel_key(row.id), 1, ex=CANCEL_FLAG_TTL_S)
    if row.status == JobStatus.queued:
        row.status = JobStatus.canceled
        row.error = "canceled before it started"
        row.finished_at = datetime.now(UTC)
        with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
            Job.fetch(kind.job_id(row.id), connection=get_redis()).cancel()
    session.flush()
    return row


def delete(session: Session, kind: JobKind, row_id: int, prefixes: Callable[[Any], Sequence[str]]) -> None:
    """Delete a job row, then (once the deletion has committed) its files under ``prefixes(row)``.

    A queued job is canceled first (its queue entry is dropped; a worker that still gets it finds no
    row and does nothing); a running one → 409: cancel it and delete it once it has stopped, so no
    worker writes files for a row that is gone. Both lock the row, as a worker starting the job does.
    """
    row = session.get(kind.model, row_id, with_for_update=True)
    if row is None:
        raise NotFound(f"{kind.name} {row_id} not found")
    if row.status == JobStatus.running:
        raise Conflict(f"{kind.name} {row.id} is running: cancel it first (POST .../{row.id}/cancel), "
                       "then delete it once it has stopped")
    if row.status == JobStatus.queued:
        cancel(session, kind, row.id)
    keys = list(prefixes(row))
    session.delete(row)
    session.flush()
    storage = get_storage()
    for key in keys:
        on_commit(session, partial(storage.delete_prefix, key))
