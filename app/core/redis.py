"""Redis connection and the RQ queues (``sam`` for GPU/CPU model work, ``cpu`` for the rest, ``preencode``
for low-priority embedding warm-up: a worker takes it only when its other queues are empty; ``train`` for
nnU-Net trainings, served by GPU workers)."""

from __future__ import annotations

from functools import lru_cache

from redis import Redis
from rq import Queue

from app.core.services import redis_url

QUEUE_NAMES = ("sam", "cpu", "preencode", "train")


@lru_cache
def get_redis() -> Redis:
    return Redis.from_url(redis_url())


def get_queue(name: str) -> Queue:
    if name not in QUEUE_NAMES:
        raise ValueError(f"unknown queue {name!r}")
    return Queue(name, connection=get_redis())
