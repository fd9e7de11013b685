"""Short Redis leases on (volume, slice) so concurrent annotators are handed different slices.

Per slice, a sorted set ``crowdsam:lease:{volume}:{slice}`` holds annotator → expiry time; a
dataset-wide sorted set ``crowdsam:leases:{dataset}`` indexes ``{volume}:{slice}:{annotator}``
→ expiry, so one read tells how many annotators are busy on every slice. A claim is one Lua
script (atomic in Redis): it drops expired entries and admits the annotator only while the
slice has a free slot (``capacity`` = annotators still needed there) and, optionally, only while
no more than ``max_busy`` others hold it — the count the caller ranked the slice by. That
optimistic check makes concurrent callers who ranked the same slice first spread out over
different slices instead of piling onto one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from redis.exceptions import RedisError

from app.core.redis import get_redis

log = logging.getLogger("crowdsam.tasks")

PREFIX = "crowdsam"

_CLAIM = """
local now = tonumber(ARGV[1])
local expires = tonumber(ARGV[2])
local annotator = ARGV[3]
local capacity = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local member = ARGV[6]
local max_busy = tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], annotator) then
  local busy = redis.call('ZCARD', KEYS[1])
  if busy >= capacity or (max_busy >= 0 and busy > max_busy) then
    return 0
  end
end
redis.call('ZADD', KEYS[1], expires, annotator)
redis.call('EXPIRE', KEYS[1], ttl + 5)
redis.call('ZADD', KEYS[2], expires, member)
redis.call('EXPIRE', KEYS[2], ttl + 5)
return 1
"""


@dataclass(frozen=True)
class Lease:
    volume_id: int
    slice: int
    annotator: str
    expires_at: float  # epoch seconds


def _slice_key(volume_id: int, k: int) -> str:
    return f"{PREFIX}:lease:{volume_id}:{k}"


def _index_key(dataset_id: int) -> str:
    return f"{PREFIX}:leases:{dataset_id}"


def held(volume_id: int, slices: Iterable[int], annotator: str) -> set[int]:
    """The slices of ``slices`` that ``annotator`` holds an unexpired lease on (one round trip)."""
    ks = sorted(set(slices))
    now = time.time()
    with get_redis().pipeline(transaction=False) as pipe:
        for k in ks:
            pipe.zscore(_slice_key(volume_id, k), annotator)
        scores = pipe.execute()
    return {k for k, score in zip(ks, scores, strict=True) if score is not None and float(score) > now}


def active(dataset_id: int) -> list[Lease]:
    """Unexpired leases of a dataset."""
    now = time.time()
    redis = get_redis()
    redis.zremrangebyscore(_index_key(dataset_id), "-inf", now)
    out = []
    entries: list[tuple[bytes, float]] = redis.zrange(_index_key(dataset_id), 0, -1, withscores=True)  # type: ignore[assignment]
    for member, score in entries:
        volume, k, annotator = member.decode().split(":", 2)
        out.append(Lease(int(volume), int(k), annotator, float(score)))
    return out


def busy(leases: list[Lease], exclude: str) -> Counter[tuple[int, int]]:
    """(volume, slice) → number of *other* annotators holding a lease there."""
    return Counter((lease.volume_id, lease.slice) for lease in leases if lease.annotator != exclude)


def claim(dataset_id: int, volume_id: int, k: int, annotator: str, capacity: int, ttl_s: int,
          max_busy: int | None = None) -> Lease | None:
    """Lease slice ``k`` to ``annotator`` if fewer than ``capacity`` (and at most ``max_busy``) others
    hold it; an annotator who already holds it has the lease renewed."""
    now = time.time()
    expires = now + ttl_s
    member = f"{volume_id}:{k}:{annotator}"
    script = get_redis().register_script(_CLAIM)
    ok = script(
        keys=[_slice_key(volume_id, k), _index_key(dataset_id)],
        args=[now, expires, annotator, capacity, ttl_s, member, -1 if max_busy is None else max_busy],
    )
    return Lease(volume_id, k, annotator, expires) if int(ok) == 1 else None


def release(dataset_id: int, volume_id: int, slices: list[int], annotator: str) -> None:
    """Drop the annotator's leases on these slices (they have been seen).

    Best effort: storing prompts must not fail because Redis is away; a lease left behind
    simply expires after ``task_lease_s``.
    """
    if not slices:
        return
    try:
        pipe = get_redis().pipeline(transaction=False)
        for k in slices:
            pipe.zrem(_slice_key(volume_id, k), annotator)
        pipe.zrem(_index_key(dataset_id), *[f"{volume_id}:{k}:{annotator}" for k in slices])
        pipe.execute()
    except RedisError as exc:
        log.warning("could not release task leases of %s on volume %s: %s", annotator, volume_id, exc)
