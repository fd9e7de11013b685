"""``Idempotency-Key`` for job-creating POSTs: a retried request gets the first answer, not a second job.

Per token and key, the first successful answer (status and JSON body) is stored in
``idempotency_keys`` in the request's own transaction, so it commits together with the rows it
describes (and not at all when the request fails: a refused request may be retried with the same key).

- same token + key + request fingerprint (sha256 of method, path and body) → the stored answer again,
  with ``Idempotent-Replayed: true``; nothing new is created;
- same token + key, another request → 422 (a key names one request);
- concurrent requests with one key: the first inserts the key (``INSERT … ON CONFLICT DO NOTHING``
  on the primary key) before it does any work; the others wait on that row until it commits, then
  replay its answer (or, if it rolled back, one of them takes the key and does the work);
- keys expire after 24 h: an older row is ignored and replaced, and a token's expired rows are
  deleted whenever it sends a key.

A JSON body is fingerprinted in canonical form (sorted keys, no spaces), so a retry that serializes
the same object differently still matches; a multipart body by its fields and its files' sha256
(the boundary differs between retries), see :func:`fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.auth.models import IdempotencyKey
from app.auth.security import Principal
from app.core.errors import Conflict, Invalid

T = TypeVar("T")
TTL = timedelta(hours=24)
HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
PENDING_STATUS = 0  # a claimed key whose answer is not stored yet (never visible outside its transaction)

KeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        min_length=1,
        max_length=200,
        pattern=r"^[!-~]([ -~]*[!-~])?$",
        description="1–200 printable ASCII characters naming this request: a retry with the same key and "
                    "request gets the first answer (header Idempotent-Replayed: true) instead of a new job; "
                    "the same key with another request → 422. Kept 24 h per token.",
    ),
]


def fingerprint(method: str, path: str, *parts: bytes) -> str:
    """sha256 over the method, the path and the body's parts (each length-prefixed, so parts cannot run together)."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), *parts):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def canonical_json(body: bytes) -> bytes:
    """The body as canonical JSON (sorted keys, compact) when it parses; else the bytes as sent."""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return body


@dataclass(frozen=True)
class Idempotency:
    """One request's key (None: the request sent none, and every method does nothing) and fingerprint."""

    key: str | None
    fingerprint: str

    def claim(self, session: Session, principal: Principal) -> JSONResponse | None:
        """Take the key for this request (None: go on and do the work), or the stored answer to replay.

        Waits while another transaction holds the same key, until it commits or rolls back.
        """
        if self.key is None:
            return None
        token, key = principal.token_id, self.key
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.token_id == token,
                                                     IdempotencyKey.created_at < func.now() - TTL))
        claimed = session.scalar(
            insert(IdempotencyKey)
            .values(token_id=token, key=key, fingerprint=self.fingerprint, status_code=PENDING_STATUS, response={})
            .on_conflict_do_nothing(index_elements=["token_id", "key"])
            .returning(IdempotencyKey.key)
        )
        if claimed is not None:
            return None
        stored = session.execute(
            select(IdempotencyKey.fingerprint, IdempotencyKey.status_code, IdempotencyKey.response)
            .where(IdempotencyKey.token_id == token, IdempotencyKey.key == key)
        ).one_or_none()
        if stored is None:  # expired and deleted by a concurrent request after our insert waited: rare
            raise Conflict(f"{HEADER} {key!r} is being reused right now; retry")
        if stored.fingerprint != self.fingerprint:
            raise Invalid(f"{HEADER} {key!r} was used for another request (method, path or body differ): "
                          "use a new key for a new request")
        if stored.status_code == PENDING_STATUS:
            raise Conflict(f"the request with {HEADER} {key!r} is still being processed; retry")
        return JSONResponse(stored.response, status_code=stored.status_code, headers={REPLAYED_HEADER: "true"})

    def run(self, session: Session, principal: Principal, status_code: int,
            create: Callable[[], T]) -> T | JSONResponse:
        """Replay the stored answer, or ``create()`` the answer and store it under the key."""
        replay = self.claim(session, principal)
        if replay is not None:
            return replay
        answer = create()
        self.remember(session, principal, status_code, answer)
        return answer

    def remember(self, session: Session, principal: Principal, status_code: int, body: Any) -> None:
        """Store the answer under the claimed key (commits with the request's transaction)."""
        if self.key is None:
            return
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.token_id == principal.token_id, IdempotencyKey.key == self.key)
            .values(status_code=status_code, response=jsonable_encoder(body))
        )


async def json_request(request: Request, key: KeyHeader = None) -> Idempotency:
    """The dependency for JSON routes: the key and the fingerprint of method, path and canonical JSON body."""
    if key is None:
        return Idempotency(None, "")
    body = canonical_json(await request.body())
    return Idempotency(key, fingerprint(request.method, request.url.path, body))


IdempotencyDep = Annotated[Idempotency, Depends(json_request)]
