"""Worker start-up: one RQ worker process on the project's queues."""

from __future__ import annotations

import os

from rq import SimpleWorker

from app.core.redis import get_queue, get_redis


def run_worker(queue_names: list[str], *, burst: bool = False) -> None:
    """Start a worker. ``SimpleWorker`` runs jobs in this process (no fork): models load once and
    CUDA contexts stay valid, which a forking worker cannot guarantee."""
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    queues = [get_queue(name) for name in queue_names]
    SimpleWorker(queues, connection=get_redis()).work(burst=burst, with_scheduler=True)
