"""How much a slice's crowd agrees, from its prompts alone (no SAM), kept up to date incrementally in Redis.

Per slice and label, the annotators who saw the slice vote "drew it" (a box or a positive point) or
"saw the slice and drew nothing for it"; the label's agreement is the lower of the majority's share
of those votes (0.5 for an even split) and the mean pairwise IoU of the drawers' boxes (each
annotator's boxes of that label taken together as their bounding box, so one box per part and one
around all parts agree). The slice's agreement is the lowest over its labels; a slice seen by fewer
than two annotators agrees fully.

Computing that for a whole dataset reads all of its prompts, so it is not done per task request:

- every write that changes what a slice's crowd said (prompts posted, imported or simulated, slices
  seen, prompts deleted) adds the slice to ``crowdsam:agreement:dirty:{dataset}`` once its transaction
  has committed (:func:`touched`; best effort, like lease releases);
- :func:`disputed` — called only when task assignment ranks past the fresh slices — lets one caller at a
  time (a Redis lock) take the dirty set, recompute those slices in one query and store the dataset's
  slices below ``min_agreement`` as one JSON value with a version (other callers meanwhile read what is
  stored, a few writes behind at most; each process keeps the last value it parsed until the version
  changes, so a call costs one small GET). The whole dataset is recomputed when nothing is stored, it
  was computed for another threshold, or it is older than ``FULL_REFRESH_S`` (which also repairs marks
  lost while Redis was away).

A mark is added only after its transaction commits, and the dirty set is taken before the query's
snapshot, so every write a query misses is still marked for the next refresh.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from app.core.db import on_commit
from app.core.redis import get_redis
from app.prompts.repository import LabelVotes, PromptRepository

log = logging.getLogger("crowdsam.tasks")

FULL_REFRESH_S = 600  # the whole dataset is recomputed at least this often
LOCK_S = 60  # a refresher that dies holds the refresh lock at most this long
KEEP_S = 7 * 24 * 3600  # a dataset nobody asks tasks of is forgotten after this long

_TAKE = """
local members = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return members
"""


def _state_key(dataset_id: int) -> str:
    return f"crowdsam:agreement:{dataset_id}"


def _version_key(dataset_id: int) -> str:
    return f"crowdsam:agreement:version:{dataset_id}"


def _dirty_key(dataset_id: int) -> str:
    return f"crowdsam:agreement:dirty:{dataset_id}"


def _lock_key(dataset_id: int) -> str:
    return f"crowdsam:agreement:lock:{dataset_id}"


def agreement(viewers: int, votes: Mapping[str, LabelVotes]) -> float:
    """How much a slice's ``viewers`` agree (1 = fully), from what they marked per label."""
    if viewers < 2:
        return 1.0
    worst = 1.0
    for vote in votes.values():
        drew = min(vote.drew, viewers)
        worst = min(worst, max(drew, viewers - drew) / viewers, 1.0 if vote.iou is None else vote.iou)
    return worst


def touched(session: Session, dataset_id: int, volume_id: int, slices: Iterable[int]) -> None:
    """Mark slices whose crowd answers change in this transaction; the mark is sent once it has committed."""
    members = [f"{volume_id}:{k}" for k in sorted(set(slices))]
    if members:
        on_commit(session, lambda: _mark(dataset_id, members))


def _mark(dataset_id: int, members: list[str]) -> None:
    try:
        get_redis().sadd(_dirty_key(dataset_id), *members)
    except RedisError as exc:  # the next full refresh (at most FULL_REFRESH_S later) catches up
        log.warning("could not mark %d slices of dataset %s for agreement: %s", len(members), dataset_id, exc)


@dataclass(frozen=True)
class _State:
    version: str
    at: float  # when the whole dataset was last recomputed (epoch seconds)
    threshold: float  # the min_agreement it was computed for
    low: dict[tuple[int, int], float]  # slices below it → their agreement


_parsed: dict[int, _State] = {}  # dataset → the state this process read last (reused while its version stands)


def _load(redis: Redis, dataset_id: int, version: bytes | str | None = None) -> _State | None:
    """The stored state (parsed again only when its version changed); ``version`` if just read."""
    if version is None:
        version = redis.get(_version_key(dataset_id))
        if version is None:
            return None
    cached = _parsed.get(dataset_id)
    if cached is not None and cached.version == (version.decode() if isinstance(version, bytes) else version):
        return cached
    blob = redis.get(_state_key(dataset_id))
    if blob is None:
        return None
    raw = json.loads(blob)
    state = _State(raw["version"], raw["at"], raw["threshold"], {(v, k): level for v, k, level in raw["low"]})
    _parsed[dataset_id] = state
    return state


def _store(redis: Redis, dataset_id: int, at: float, threshold: float, low: dict[tuple[int, int], float]) -> _State:
    version = uuid.uuid4().hex
    blob = json.dumps({"version": version, "at": at, "threshold": threshold,
                       "low": [[v, k, level] for (v, k), level in sorted(low.items())]})
    with redis.pipeline(transaction=True) as pipe:  # the value and its version change together
        pipe.set(_state_key(dataset_id), blob, ex=KEEP_S)
        pipe.set(_version_key(dataset_id), version, ex=KEEP_S)
        pipe.execute()
    state = _State(version, at, threshold, low)
    _parsed[dataset_id] = state
    return state


def _due(state: _State | None, min_agreement: float) -> bool:
    return state is None or state.threshold != min_agreement or time.time() - state.at > FULL_REFRESH_S


def disputed(session: Session, dataset_id: int, min_agreement: float) -> dict[tuple[int, int], float]:
    """(volume, slice) → agreement of the dataset's slices whose agreement is below ``min_agreement``.

    One round trip when nothing changed since this process last looked; otherwise one caller at a time
    recomputes what changed (the others use what is stored)."""
    redis = get_redis()
    with redis.pipeline(transaction=False) as pipe:
        pipe.get(_version_key(dataset_id))
        pipe.exists(_dirty_key(dataset_id))
        version, dirty = pipe.execute()
    state = _load(redis, dataset_id, version) if version is not None else None
    if (dirty or _due(state, min_agreement)) and redis.set(_lock_key(dataset_id), "1", nx=True, ex=LOCK_S):
        try:
            state = _refresh(redis, session, dataset_id, min_agreement)
        finally:
            redis.delete(_lock_key(dataset_id))
    return state.low if state is not None and state.threshold == min_agreement else {}


def _refresh(redis: Redis, session: Session, dataset_id: int, min_agreement: float) -> _State | None:
    """Under the lock: recompute the slices marked since the last refresh, or the whole dataset when due."""
    state = _load(redis, dataset_id)  # again: another caller may have stored a newer one meanwhile
    repo = PromptRepository(session)
    if state is None or _due(state, min_agreement):
        redis.delete(_dirty_key(dataset_id))  # before the query's snapshot: later writes stay marked
        started = time.time()
        votes = repo.slice_votes(dataset_id=dataset_id)
        low = {s: level for s, (n, marks) in votes.items() if (level := agreement(n, marks)) < min_agreement}
        return _store(redis, dataset_id, started, min_agreement, low)
    taken: list[bytes] = redis.register_script(_TAKE)(keys=[_dirty_key(dataset_id)])
    if not taken:
        return state
    slices = sorted((int(v), int(k)) for v, k in (m.decode().split(":") for m in taken))
    votes = repo.slice_votes(slices)
    low = dict(state.low)
    for s in slices:
        level = agreement(*votes[s]) if s in votes else 1.0
        if level < min_agreement:
            low[s] = level
        else:
            low.pop(s, None)
    return _store(redis, dataset_id, state.at, min_agreement, low)
