"""What routes document beyond their success response: the error body and one mapping per kind of error.

Every error leaves through one handler (``app.main``) as ``{"detail": ...}``: a message string, or a
list of ``{"loc", "msg", "type", ...}`` items for field-level problems (request validation, prompt and
YOLO file checks). Routes list the kinds they can answer with ``responses=errors(404, 409)``; the
statuses every ``/api/v1`` route shares (401 bad token, 503 overload or a backing service down) are
added where the API routers are included. Path and query ids share one type so their range is
documented (and an id past the database's integer range is a 422, not a database error).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

PG_INT_MAX = 2_147_483_647  # ids are PostgreSQL ``integer`` serials
PG_BIGINT_MAX = 9_223_372_036_854_775_807


class ErrorItem(BaseModel):
    """One field-level problem (extra keys such as ``file``/``line`` may follow)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description="where: body/query/path keys and indexes, or file and line")
    msg: str
    type: str


class ErrorOut(BaseModel):
    """The body of every error response."""

    detail: str | list[ErrorItem] = Field(description="a message, or one item per problem")


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    400: _error("Malformed request (e.g. an unreadable multipart body)"),
    401: _error("Missing, unknown or revoked bearer token"),
    403: _error("The token's role may not do this"),
    404: _error("Not found"),
    409: _error("Conflicts with the current state (duplicate name, job not finished, ...)"),
    413: _error("Request body or upload too large"),
    422: _error("Invalid input"),
    429: _error("Too many requests: a per-user limit (e.g. active jobs) or the token's write rate is reached; "
                "retry after Retry-After"),
    503: _error("Overloaded, or a backing service (PostgreSQL, Redis, the job queue) is unreachable; "
                "retry after Retry-After"),
    507: _error("Insufficient storage: the server's disk is full; nothing was stored, retry once space is freed"),
}

# Answered by every /api/v1 route: token checks and admission control / backing services.
API_ERRORS = (401, 413, 503)  # 413: any body above its route kind's limit (app.core.limits)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses for ``codes`` (each one shared mapping from ``ERROR_RESPONSES``)."""
    return {code: ERROR_RESPONSES[code] for code in codes}


Id = Annotated[int, Path(ge=1, le=PG_INT_MAX, description="id (a positive integer)")]
BigId = Annotated[int, Path(ge=1, le=PG_BIGINT_MAX, description="id (a positive integer)")]
DatasetQuery = Annotated[int, Query(ge=1, le=PG_INT_MAX, description="dataset id")]
