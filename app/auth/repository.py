from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from app.auth.models import ApiToken
from app.core.pagination import keyset
from app.core.repository import BaseRepository


class TokenRepository(BaseRepository[ApiToken]):
    model = ApiToken
    what = "token"

    def by_name(self, name: str) -> ApiToken | None:
        return self.session.scalar(select(ApiToken).where(ApiToken.name == name))

    def get(self, token_id: int) -> ApiToken | None:
        return self.find(token_id)

    def list(self) -> Sequence[ApiToken]:
        return self.session.scalars(select(ApiToken).order_by(ApiToken.id)).all()

    def page(self, after: int | None, limit: int) -> Sequence[ApiToken]:
        """Tokens by id after ``after`` (``limit`` + 1 rows: see :func:`app.core.pagination.keyset`)."""
        return self.session.scalars(keyset(select(ApiToken), ApiToken.id, after, limit)).all()
