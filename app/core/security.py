"""Bearer tokens and roles.

Tokens are random (``csam_`` + 32 bytes, URL-safe) and stored as SHA-256: a leaked database
does not leak usable tokens, and lookup stays one indexed equality. Roles decide what a token
may do; each route declares the roles it admits with :func:`require`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.models import ApiToken, Role
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.errors import Forbidden, Unauthorized

bearer = HTTPBearer(auto_error=False, description="API token from `crowdsam token create`")


def new_token() -> str:
    settings = get_settings()
    return settings.token_prefix + secrets.token_urlsafe(settings.token_bytes)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name (the annotator identity) and role."""

    token_id: int
    name: str
    role: Role

    @property
    def is_annotator(self) -> bool:
        return self.role is Role.annotator


_principals: dict[str, tuple[float, Principal]] = {}  # token hash → (valid until, principal)


def _lookup(session: Session, token_hash: str) -> Principal | None:
    row = session.scalar(
        select(ApiToken).where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None))
    )
    return None if row is None else Principal(row.id, row.name, Role(row.role))


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
        return cached[1]
    principal = await run_in_threadpool(_lookup, session, token_hash)
    if principal is None:
        raise Unauthorized()
    ttl = get_settings().token_cache_s
    if ttl > 0:
        if len(_principals) > 100_000:
            _principals.clear()
        _principals[token_hash] = (now + ttl, principal)
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
