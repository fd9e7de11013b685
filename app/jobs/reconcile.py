"""The reconciler: job rows and RQ agree again after crashes, lost hosts and Redis restarts.

Run every :data:`INTERVAL_S` by each worker's scheduler process (``workers.scheduler``), one
at a time over all hosts (a Redis lock). Each round:

1. RQ's started-job registries are cleaned up: an execution whose heartbeat expired belongs to
   a dead worker (workers refresh it every few seconds, see ``workers.run``), so a worker lost
   with its host is noticed within ``CROWDSAM_JOB_HEARTBEAT_S`` (60 s) plus one round (30 s).
   RQ retries or fails the job and its failure callback (:func:`app.jobs.runner.job_failed`)
   updates the row.
2. Rows that are ``queued`` or ``running`` for longer than :data:`GRACE_S` are compared with
   their RQ job: a missing job (enqueue failed after the commit, or Redis lost its data) is
   enqueued again; a job RQ failed, stopped or requeued gives the row the same state.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from redis import Redis
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from sqlalchemy import func, or_, select, update

from app.core.db import session_scope
from app.core.redis import QUEUE_NAMES, get_redis
from app.jobs.kinds import JobKind, all_kinds
from app.jobs.states import JobStatus
from app.jobs.submit import enqueue

log = logging.getLogger("crowdsam.reconciler")

INTERVAL_S = 30
GRACE_S = 60
LOCK_KEY = "crowdsam:jobs:reconciler"
WAITING = (RQStatus.QUEUED, RQStatus.SCHEDULED, RQStatus.DEFERRED, RQStatus.CREATED, RQStatus.READY_TO_ENQUEUE)


def reconcile(connection: Redis | None = None, *, grace_s: float = GRACE_S) -> Counter[str]:
    """One round (see the module docstring); returns what it did, e.g. ``{"enqueued": 1}``."""
    connection = connection or get_redis()
    for name in QUEUE_NAMES:
        StartedJobRegistry(name, connection=connection).cleanup()
    done: Counter[str] = Counter()
    for kind in all_kinds():
        _reconcile_rows(kind, connection, grace_s, done)
    if done:
        log.warning("reconciled job rows with the queue: %s", dict(done))
    return done


def reconcile_if_due(connection: Redis | None = None) -> Counter[str] | None:
    """Run a round unless another process ran one less than :data:`INTERVAL_S` ago."""
    connection = connection or get_redis()
    if not connection.set(LOCK_KEY, uuid.uuid4().hex, nx=True, ex=INTERVAL_S - 1):
        return None
    return reconcile(connection)


def _reconcile_rows(kind: JobKind, connection: Redis, grace_s: float, done: Counter[str]) -> None:
    model = kind.model
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
    with session_scope() as session:
        rows = session.execute(
            select(model.id, model.status).where(
                or_(model.status == JobStatus.queued, model.status == JobStatus.running),
                func.coalesce(model.started_at, model.created_at) < cutoff,
            )
        ).all()
    if not rows:
        return
    jobs = Job.fetch_many([kind.job_id(row_id) for row_id, _ in rows], connection=connection)
    for (row_id, status), job in zip(rows, jobs, strict=True):
        if job is None:
            if not _set_if(kind, row_id, status, status=JobStatus.queued,
                           error="its queue entry was lost (enqueue failed or Redis lost data): queued again"):
                continue
            with session_scope() as session:
                row = session.get(model, row_id)
                description = kind.describe(row) if row is not None else kind.job_id(row_id)
            enqueue(kind, row_id, description)
            done["enqueued"] += 1
            continue
        rq_status = job.get_status(refresh=False)
        if rq_status == RQStatus.FAILED:
            result = job.latest_result()
            last = (result.exc_string or "").strip().splitlines()[-1:] if result is not None else []
            detail = last[0] if last else "no reason recorded"
            done["failed"] += _set_if(kind, row_id, status, status=JobStatus.failed,
                                      error=f"the job failed in the queue: {detail}"[:4000],
                                      finished_at=datetime.now(UTC))
        elif rq_status in (RQStatus.STOPPED, RQStatus.CANCELED):
            done["canceled"] += _set_if(kind, row_id, status, status=JobStatus.canceled,
                                        error=f"the queue {rq_status.value} the job", finished_at=datetime.now(UTC))
        elif rq_status in WAITING and status == JobStatus.running:
            done["requeued"] += _set_if(kind, row_id, status, status=JobStatus.queued,
                                        error="the worker running this job died; it was handed back for a retry")


def _set_if(kind: JobKind, row_id: int, expected: str, **values: object) -> int:
    """Update the row only if its status is still ``expected`` (a worker may have moved it meanwhile)."""
    model = kind.model
    with session_scope() as session:
        changed = session.execute(
            update(model).where(model.id == row_id, model.status == expected).values(**values).returning(model.id)
        ).all()
        session.commit()
    return len(changed)
