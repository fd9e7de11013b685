"""Progress written to the job's row (throttled) and the cancel flag checked on every tick."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import update

from app.core.db import session_scope
from app.core.jobs import JobStatus
from app.segmentations.models import Segmentation
from app.segmentations.service import cancel_requested


class Canceled(Exception):
    """Raised from the progress callback to stop the engine when a cancel was requested."""


class ProgressReporter:
    """Engine progress callback ``(done, total)``: raises :class:`Canceled` when asked to stop,
    writes ``{"done", "total"}`` to the row at most every ``min_interval`` seconds (and always at the end)."""

    def __init__(self, segmentation_id: int, *, min_interval: float = 1.0) -> None:
        self.segmentation_id = segmentation_id
        self.min_interval = min_interval
        self._last_write = float("-inf")
        self.writes = 0

    def check_cancel(self) -> None:
        if cancel_requested(self.segmentation_id):
            raise Canceled(f"segmentation {self.segmentation_id} was canceled")

    def __call__(self, done: int, total: int) -> None:
        self.check_cancel()
        now = time.monotonic()
        if done < total and now - self._last_write < self.min_interval:
            return
        self.write(done, total)
        self._last_write = now

    def write(self, done: int, total: int, **extra: Any) -> None:
        with session_scope() as session:
            session.execute(
                update(Segmentation)
                .where(Segmentation.id == self.segmentation_id, Segmentation.status == JobStatus.running)
                .values(progress={"done": int(done), "total": int(total), **extra})
            )
            session.commit()
        self.writes += 1
