from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.models import ApiToken, Role
from app.auth.repository import TokenRepository
from app.auth.security import hash_token, new_token
from app.core.errors import Conflict, NotFound


def create_token(session: Session, name: str, role: Role,
                 expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """Create a token (valid until ``expires_at``, None = until revoked); returns the row and the secret."""
    repo = TokenRepository(session)
    if repo.by_name(name) is not None:
        raise Conflict(f"a token named {name!r} already exists")
    secret = new_token()
    try:
        with session.begin_nested():  # a concurrent request may take the name between check and insert
            row = repo.add(ApiToken(name=name, role=role, token_hash=hash_token(secret), prefix=secret[:10],
                                    expires_at=expires_at))
    except IntegrityError as exc:
        raise Conflict(f"a token named {name!r} already exists") from exc
    return row, secret


def revoke_token(session: Session, token_id: int) -> ApiToken:
    row = TokenRepository(session).get(token_id)
    if row is None:
        raise NotFound(f"token {token_id} not found")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    return row
