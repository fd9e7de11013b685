"""Redis connection and the RQ queues (``sam`` for GPU/CPU model work, ``cpu`` for the rest)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from redis import Redis
from rq import Queue, Retry

from app.core.config import get_settings
from app.core.services import redis_url

QUEUE_NAMES = ("sam", "cpu")


@lru_cache
def get_redis() -> Redis:
    return Redis.from_url(redis_url())


def get_queue(name: str) -> Queue:
    if name not in QUEUE_NAMES:
        raise ValueError(f"unknown queue {name!r}")
    return Queue(name, connection=get_redis())


def enqueue_job(queue_name: str, func: str, row_id: int, *, job_id: str, description: str,
                retry_intervals: Sequence[int]) -> None:
    """Enqueue a job by dotted path with the project's timeout, retry and result-retention policy."""
    get_queue(queue_name).enqueue(
        func,
        row_id,
        job_id=job_id,
        job_timeout=get_settings().job_timeout_s,
        retry=Retry(max=len(retry_intervals), interval=list(retry_intervals)),
        result_ttl=24 * 3600,
        failure_ttl=7 * 24 * 3600,
        description=description,
    )
