"""Masks ready before they are asked for: workers encode and decode while the crowd is still drawing.

When a slice is handed to an annotator (``GET /tasks/next``) or a volume is uploaded into a dataset
whose annotation has started, its slices go to the low-priority ``preencode`` queue
(``workers.jobs.preencode``): a worker with nothing better to do fills its embedding cache. When
prompts are stored (API, imports, simulations) the volume gets one pre-decoding job there: each new
prompt's decoder output is cached, so the segmentation request after the crowd's last box only fuses.
One decoding job per volume waits at a time (a Redis mark the job clears when it starts, so prompts
posted while it runs queue the next).

Best effort by design: a lost request costs encoder time later, never a result, so Redis errors are
logged, not raised, and nothing is stored in PostgreSQL. Each (model, volume, slice) is requested at
most once per ``CROWDSAM_PREENCODE_TTL_S`` (a Redis ``SET NX`` key per slice), so a crowd asking for
tasks does not flood the queue. The models come from ``CROWDSAM_PREENCODE_MODELS`` (empty: off).
An embedding cache is per worker host: pre-encoding pays off where the same host segments.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.redis import get_queue, get_redis

log = logging.getLogger("crowdsam.preencode")

QUEUE = "preencode"
ENTRY = "workers.jobs.preencode.preencode"
DECODE_ENTRY = "workers.jobs.preencode.predecode"
PENDING = "crowdsam_preencode_requests"
PENDING_DECODE = "crowdsam_predecode_requests"
RESULT_TTL_S = 600


def models() -> list[str]:
    return [name.strip() for name in get_settings().preencode_models.split(",") if name.strip()]


def request(volume_id: int, slices: Iterable[int]) -> int:
    """Queue the slices not requested recently; returns how many (slice, model) pairs were queued."""
    wanted = sorted({int(k) for k in slices})
    names = models()
    if not wanted or not names:
        return 0
    settings = get_settings()
    queued = 0
    try:
        redis = get_redis()
        for model in names:
            pipe = redis.pipeline(transaction=False)
            for k in wanted:
                pipe.set(f"crowdsam:preencode:{model}:{volume_id}:{k}", 1, nx=True, ex=settings.preencode_ttl_s)
            fresh = [k for k, new in zip(wanted, pipe.execute(), strict=True) if new]
            if fresh:
                get_queue(QUEUE).enqueue(
                    ENTRY, volume_id, fresh, model, job_timeout=settings.job_timeout_s, result_ttl=RESULT_TTL_S,
                    failure_ttl=24 * 3600,
                    description=f"pre-encode {len(fresh)} slice(s) of volume {volume_id} for {model}")
                queued += len(fresh)
    except RedisError:
        log.warning("pre-encoding of volume %s not requested (Redis unavailable)", volume_id, exc_info=True)
    return queued


def _decode_mark(model: str, volume_id: int) -> str:
    return f"crowdsam:predecode:{model}:{volume_id}"


def request_decode(volume_id: int) -> bool:
    """Queue a pre-decoding job for the volume unless one is already waiting; True when one was queued."""
    settings, queued = get_settings(), False
    try:
        redis = get_redis()
        for model in models():
            if redis.set(_decode_mark(model, volume_id), 1, nx=True, ex=settings.job_timeout_s):
                get_queue(QUEUE).enqueue(
                    DECODE_ENTRY, volume_id, model, job_timeout=settings.job_timeout_s, result_ttl=RESULT_TTL_S,
                    failure_ttl=24 * 3600, description=f"pre-decode the prompts of volume {volume_id} for {model}")
                queued = True
    except RedisError:
        log.warning("pre-decoding of volume %s not requested (Redis unavailable)", volume_id, exc_info=True)
    return queued


def decode_started(volume_id: int, model: str) -> None:
    """A pre-decoding job starts: prompts stored from now on need the next job."""
    try:
        get_redis().delete(_decode_mark(model, volume_id))
    except RedisError:
        log.warning("pre-decoding mark of volume %s not cleared (Redis unavailable)", volume_id, exc_info=True)


def request_decode_after_commit(session: Session, volume_id: int) -> None:
    """:func:`request_decode` once ``session`` commits (the worker must see the new prompts)."""
    session.info.setdefault(PENDING_DECODE, set()).add(volume_id)


def request_after_commit(session: Session, volume_id: int, slices: Iterable[int]) -> None:
    """:func:`request` once ``session`` commits (a new volume must be visible to the worker)."""
    session.info.setdefault(PENDING, []).append((volume_id, list(slices)))


@event.listens_for(Session, "after_commit")
def _request_committed(session: Session) -> None:
    for volume_id, slices in session.info.pop(PENDING, []):
        request(volume_id, slices)
    for volume_id in sorted(session.info.pop(PENDING_DECODE, set())):
        request_decode(volume_id)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(PENDING, None)
    session.info.pop(PENDING_DECODE, None)
