"""Dataset membership: who may see and work on which dataset.

A dataset has members: researchers who own (manage) it and annotators who may label it. Admins
may do everything without being members. A non-member is told the resource does not exist (404),
so dataset names and ids do not leak. What a member may do is still decided by the role matrix
(``app.auth.security``): an annotator member labels, an owner manages.

One dependency, :func:`dataset_access`, runs on every ``/api/v1`` route: it finds the dataset a
route's path names (``dataset_id``, ``volume_id``, ``segmentation_id``, ``export_id``,
``evaluation_id``, ``training_id``, ``prompt_id``, or the ``dataset`` query of ``/tasks/next``) and checks the
caller's membership. Both answers are cached per process (a resource never moves to another
dataset; a membership change reaches other processes within ``token_cache_s``), so the crowd's hot
path (prompt posts with a known token) costs no extra query.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cachetools import LRUCache
from fastapi import Request
from sqlalchemy import Select, exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.models import ApiToken, Role
from app.auth.security import CurrentPrincipal, Principal
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.errors import Invalid, NotFound
from app.core.responses import PG_INT_MAX
from app.datasets.models import Dataset, DatasetMember, MemberRole
from app.evaluations.models import Evaluation
from app.exports.models import Export
from app.prompts.models import Prompt
from app.segmentations.models import Segmentation
from app.trainings.models import Training
from app.volumes.models import Volume

# Path parameter → (what it names, the query of its dataset id)
_OWNERS: dict[str, tuple[str, Any]] = {
    "dataset_id": ("dataset", lambda i: select(Dataset.id).where(Dataset.id == i)),
    "volume_id": ("volume", lambda i: select(Volume.dataset_id).where(Volume.id == i)),
    "segmentation_id": ("segmentation", lambda i: select(Volume.dataset_id)
                        .join(Segmentation, Segmentation.volume_id == Volume.id).where(Segmentation.id == i)),
    "export_id": ("export", lambda i: select(Export.dataset_id).where(Export.id == i)),
    "evaluation_id": ("evaluation", lambda i: select(Evaluation.dataset_id).where(Evaluation.id == i)),
    "training_id": ("training", lambda i: select(Training.dataset_id).where(Training.id == i)),
    "prompt_id": ("prompt", lambda i: select(Volume.dataset_id)
                  .join(Prompt, Prompt.volume_id == Volume.id).where(Prompt.id == i)),
}
_CACHE_SIZE = 100_000


class _Lru:
    """A bounded LRU map used from the event loop and from worker threads (``LRUCache`` itself is not thread-safe)."""

    def __init__(self) -> None:
        self._cache: LRUCache[Any, Any] = LRUCache(maxsize=_CACHE_SIZE)
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            return self._cache.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._cache[key] = value

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


_dataset_of = _Lru()  # (param, id) → dataset id (resources never change dataset; only found ones)
_membership = _Lru()  # (token id, dataset id) → (valid until, is member)


def forget_memberships() -> None:
    """Drop this process's membership answers (after a membership change committed)."""
    _membership.clear()


def member_dataset_ids(session: Session, principal: Principal) -> Select[Any] | None:
    """A query of the dataset ids the caller may see; None for admins (every dataset)."""
    if principal.role is Role.admin:
        return None
    return select(DatasetMember.dataset_id).where(DatasetMember.token_id == principal.token_id)


def is_member(session: Session, principal: Principal, dataset_id: int) -> bool:
    if principal.role is Role.admin:
        return True
    key = (principal.token_id, dataset_id)
    now = time.monotonic()
    cached = _membership.get(key)
    if cached is not None and cached[0] > now:
        return bool(cached[1])
    member = bool(session.scalar(select(exists().where(
        DatasetMember.dataset_id == dataset_id, DatasetMember.token_id == principal.token_id))))
    ttl = get_settings().token_cache_s
    if ttl > 0:
        _membership.put(key, (now + ttl, member))
    return member


def check_member(session: Session, principal: Principal, dataset_id: int, what: str, ident: int) -> None:
    """404 (as if absent) unless the caller may see the dataset that ``what`` ``ident`` belongs to."""
    if not is_member(session, principal, dataset_id):
        raise NotFound(f"{what} {ident} not found")


def _scope(request: Request) -> tuple[str, str, int] | None:
    """(parameter, what, id) of the dataset-scoped parameter the request names, if any."""
    params = request.path_params
    for name, (what, _) in _OWNERS.items():
        if name in params:
            return name, what, _int(params[name])
    if request.url.path.endswith("/tasks/next") and "dataset" in request.query_params:
        return "dataset_id", "dataset", _int(request.query_params["dataset"])
    return None


def _int(raw: Any) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return 0  # the route's own validation answers 422
    return value if 1 <= value <= PG_INT_MAX else 0


def _dataset_of_scope(session: Session, name: str, ident: int) -> int | None:
    cached = _dataset_of.get((name, ident))
    if cached is None:
        cached = session.scalar(_OWNERS[name][1](ident))
        if cached is not None:
            _dataset_of.put((name, ident), cached)
    return cached


def _check(session: Session, principal: Principal, name: str, what: str, ident: int) -> None:
    dataset_id = _dataset_of_scope(session, name, ident)
    if dataset_id is not None:  # absent: the route answers its own 404
        check_member(session, principal, dataset_id, what, ident)


async def dataset_access(request: Request, session: SessionDep, principal: CurrentPrincipal) -> None:
    """Router dependency: the caller must be a member of the dataset the route's path names."""
    scope = _scope(request)
    if scope is None or principal.role is Role.admin or scope[2] == 0:
        return
    name, what, ident = scope
    cached = _dataset_of.get((name, ident))
    if cached is not None:
        entry = _membership.get((principal.token_id, cached))
        if entry is not None and entry[0] > time.monotonic():
            if not entry[1]:
                raise NotFound(f"{what} {ident} not found")
            return
    await run_in_threadpool(_check, session, principal, name, what, ident)


def add_member(session: Session, dataset: Dataset, token: ApiToken) -> DatasetMember:
    """Give ``token`` access to ``dataset``: researchers own it, annotators label it (admins need no row)."""
    role = Role(token.role)
    if role is Role.admin:
        raise Invalid(f"{token.name!r} is an admin: admins may use every dataset without being members")
    if token.revoked_at is not None:
        raise Invalid(f"token {token.name!r} is revoked")
    member_role = MemberRole.owner if role is Role.researcher else MemberRole.annotator
    session.execute(insert(DatasetMember).values(dataset_id=dataset.id, token_id=token.id, role=member_role)
                    .on_conflict_do_nothing())
    member = session.get(DatasetMember, (dataset.id, token.id), populate_existing=True)
    assert member is not None
    return member
