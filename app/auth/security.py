"""Bearer tokens and roles.

Tokens are random (``csam_`` + 32 bytes, URL-safe) and stored as SHA-256: a leaked database
does not leak usable tokens, and lookup stays one indexed equality. Roles decide what a token
may do; each route declares the roles it admits with :func:`require`.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.models import ApiToken, Role
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.errors import Forbidden, Unauthorized
from app.core.hashing import sha256_text

log = logging.getLogger("crowdsam.auth")
LAST_USED_EVERY_S = 60.0  # last_used_at is written at most once a minute per token (and process)

bearer = HTTPBearer(auto_error=False, description="API token from `crowdsam token create`")


def new_token() -> str:
    settings = get_settings()
    return settings.token_prefix + secrets.token_urlsafe(settings.token_bytes)


def hash_token(token: str) -> str:
    return sha256_text(token)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name (the annotator identity) and role."""

    token_id: int
    name: str
    role: Role
    expires_at: float | None = None  # epoch seconds; None = never

    @property
    def is_annotator(self) -> bool:
        return self.role is Role.annotator


_principals: dict[str, tuple[float, Principal]] = {}  # token hash → (valid until, principal)


def _lookup(session: Session, token_hash: str) -> Principal | None:
    row = session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == token_hash,
            ApiToken.revoked_at.is_(None),
            or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > func.now()),
        )
    )
    if row is None:
        return None
    expires = None if row.expires_at is None else row.expires_at.timestamp()
    return Principal(row.id, row.name, Role(row.role), expires)


_last_used: dict[int, float] = {}  # token id → when this process last scheduled a last_used_at write
_last_used_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crowdsam-last-used")


def _write_last_used(token_id: int) -> None:
    """One short transaction of its own; a no-op when another process wrote within the minute."""
    from app.core.db import get_engine

    try:
        with get_engine().begin() as conn:
            conn.execute(
                update(ApiToken)
                .where(
                    ApiToken.id == token_id,
                    or_(ApiToken.last_used_at.is_(None),
                        ApiToken.last_used_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, LAST_USED_EVERY_S)),
                )
                .values(last_used_at=func.now())
            )
    except Exception as exc:  # best effort: a missed "last used" never fails or slows a request
        log.warning("could not record the last use of token %d: %s", token_id, exc)


def note_use(token_id: int) -> Future[None] | None:
    """Schedule a ``last_used_at`` write, at most once per ``LAST_USED_EVERY_S`` per token, off the request.

    The request neither waits for it nor holds a second pooled connection: one background thread writes.
    """
    now = time.monotonic()
    last = _last_used.get(token_id)
    if last is not None and now - last < LAST_USED_EVERY_S:
        return None
    if len(_last_used) > 100_000:
        _last_used.clear()
    _last_used[token_id] = now
    return _last_used_writer.submit(_write_last_used, token_id)


def forget_token(token_hash: str) -> None:
    """Drop a token from this process's cache (after its revocation committed)."""
    _principals.pop(token_hash, None)


async def current_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, from a short per-process cache (``token_cache_s``) or one indexed lookup in a thread.

    Async on purpose: a cached token costs no thread hop and takes no pooled connection.
    """
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized()
    token_hash = hash_token(credentials.credentials)
    now = time.monotonic()
    cached = _principals.get(token_hash)
    if cached is not None and cached[0] > now:
        known = cached[1]
        if known.expires_at is not None and known.expires_at <= time.time():
            _principals.pop(token_hash, None)  # expired while cached: like a revoked token
            raise Unauthorized()
        note_use(known.token_id)
        return known
    principal = await run_in_threadpool(_lookup, session, token_hash)
    if principal is None:
        raise Unauthorized()
    ttl = get_settings().token_cache_s
    if principal.expires_at is not None:
        ttl = min(ttl, principal.expires_at - time.time())  # a cache entry never outlives the token
    if ttl > 0:
        if len(_principals) > 100_000:
            _principals.clear()
        _principals[token_hash] = (now + ttl, principal)
    note_use(principal.token_id)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(*roles: Role) -> Any:
    """Dependency factory: the caller's role must be one of ``roles``."""

    async def dependency(principal: CurrentPrincipal) -> Principal:  # async: no thread for a set lookup
        if principal.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(f"role '{principal.role.value}' may not do this (needs: {allowed})")
        return principal

    return Depends(dependency)


ANYONE = (Role.admin, Role.researcher, Role.annotator)
STAFF = (Role.admin, Role.researcher)

Anyone = Annotated[Principal, require(*ANYONE)]
Staff = Annotated[Principal, require(*STAFF)]
Admin = Annotated[Principal, require(Role.admin)]
