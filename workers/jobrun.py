"""Job-row bookkeeping shared by the export and evaluation runners (status, progress, errors)."""

from __future__ import annotations

import traceback
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update

from app.core.db import session_scope
from app.core.jobs import JobStatus
from app.core.storage import Storage, get_storage


def start(model: Any, row_id: int) -> bool:
    """Mark a queued/running/failed row running (retries allowed); False when it is finished or canceled."""
    with session_scope() as session:
        row = session.get(model, row_id, with_for_update=True)
        if row is None or row.status in (JobStatus.finished, JobStatus.canceled):
            return False
        row.status = JobStatus.running
        row.started_at = datetime.now(UTC)
        row.attempts = (row.attempts or 0) + 1
        row.error = None
        session.commit()
    return True


def progress(model: Any, row_id: int, done: int, total: int) -> None:
    with session_scope() as session:
        session.execute(
            update(model).where(model.id == row_id).values(progress={"done": int(done), "total": int(total)})
        )
        session.commit()


def finish(model: Any, row_id: int, **values: Any) -> None:
    """Set the result columns and ``finished`` in one commit (after every file is in the store)."""
    with session_scope() as session:
        session.execute(
            update(model)
            .where(model.id == row_id)
            .values(status=JobStatus.finished, finished_at=datetime.now(UTC), **values)
        )
        session.commit()


def fail(model: Any, row_id: int, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}"
    with session_scope() as session:
        session.execute(
            update(model)
            .where(model.id == row_id)
            .values(status=JobStatus.failed, finished_at=datetime.now(UTC), error=message[:4000])
        )
        session.commit()
    traceback.print_exception(exc)


class RowJob:
    """A job over one row of ``model``: marks it running, runs ``_run``, records any failure.

    Subclasses set ``model`` and implement ``_run``; ``row_id`` and ``storage`` are set here.
    """

    model: Any

    def __init__(self, row_id: int, storage: Storage | None = None) -> None:
        self.row_id = row_id
        self.storage = storage or get_storage()

    def run(self) -> dict[str, Any]:
        if not start(self.model, self.row_id):
            return {"skipped": True}
        try:
            return self._run()
        except BaseException as exc:
            fail(self.model, self.row_id, exc)
            raise

    def _run(self) -> dict[str, Any]:
        raise NotImplementedError
