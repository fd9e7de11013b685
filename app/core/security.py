"""Bearer tokens and roles.

Tokens are random (``csam_`` + 32 bytes, URL-safe) and stored as SHA-256: a leaked database
does not leak usable tokens, and lookup stays one indexed equality. Roles decide what a token
may do; each route declares the roles it admits with :func:`require`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

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


def current_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized()
    row = session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(credentials.credentials), ApiToken.revoked_at.is_(None)
        )
    )
    if row is None:
        raise Unauthorized()
    return Principal(row.id, row.name, Role(row.role))


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(*roles: Role) -> Any:
    """Dependency factory: the caller's role must be one of ``roles``."""

    def dependency(principal: CurrentPrincipal) -> Principal:
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
