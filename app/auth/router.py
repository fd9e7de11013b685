from __future__ import annotations

from fastapi import APIRouter, status

from app.auth import service
from app.auth.repository import TokenRepository
from app.auth.schemas import Me, TokenCreate, TokenCreated, TokenOut
from app.auth.security import Admin, Anyone, forget_token
from app.core.db import SessionDep
from app.core.pagination import LINK_HEADER_DOC, PageDep
from app.core.responses import Id, errors

router = APIRouter(tags=["auth"])


@router.get("/me", response_model=Me)
def me(principal: Anyone) -> Me:
    """Who the bearer token belongs to."""
    return Me(id=principal.token_id, name=principal.name, role=principal.role)


@router.post(
    "/tokens",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 409, 422),
)
def create_token(body: TokenCreate, session: SessionDep, _: Admin) -> TokenCreated:
    """Create an API token (admin). The secret is returned once."""
    row, secret = service.create_token(session, body.name, body.role, body.expiry())
    return TokenCreated(**TokenOut.model_validate(row).model_dump(), token=secret)


@router.get("/tokens", response_model=list[TokenOut], responses={**LINK_HEADER_DOC, **errors(403, 422)})
def list_tokens(session: SessionDep, _: Admin, page: PageDep) -> list[TokenOut]:
    """List API tokens (admin) by id, paginated (``limit``, ``after``, ``Link``); secrets are never returned."""
    return [TokenOut.model_validate(t) for t in page.rows(TokenRepository(session).page(page.after, page.limit))]


@router.delete("/tokens/{token_id}", response_model=TokenOut, responses=errors(403, 404, 422))
def revoke_token(token_id: Id, session: SessionDep, _: Admin) -> TokenOut:
    """Revoke an API token (admin)."""
    row = service.revoke_token(session, token_id)
    session.commit()
    forget_token(row.token_hash)  # other API processes stop accepting it within token_cache_s
    return TokenOut.model_validate(row)
