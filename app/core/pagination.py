"""Keyset pagination for list endpoints: ``?limit=&after=``, a JSON array, and an RFC 8288 ``Link`` header.

A list answers at most ``limit`` rows (default 100, at most 1000) in id order (ascending, or
descending where the list is "newest first"); ``after`` is the last id the client has seen, and the
next page starts right after it in that order. When more rows exist the answer carries
``Link: </api/v1/...?limit=100&after=42>; rel="next"`` (a relative reference to the next page); the
last page has no ``Link``. Keyset, not offset: a page never skips or repeats a row when rows are added
or deleted between requests, and every page costs one index range scan.

Routers take :data:`PageDep`; repositories apply :func:`keyset` (which fetches one row more than the
page, so the router knows whether a next page exists) and routers trim with :meth:`Page.rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request, Response
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute

from app.core.responses import PG_INT_MAX

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

T = TypeVar("T")
S = TypeVar("S", bound=Select[Any])

LINK_HEADER_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "Link": {
                "description": 'RFC 8288 `<...?limit=N&after=ID>; rel="next"` when more rows exist (absent on '
                               "the last page)",
                "schema": {"type": "string"},
            }
        }
    }
}


@dataclass(frozen=True)
class Page:
    limit: int
    after: int | None
    request: Request
    response: Response

    def rows(self, fetched: Sequence[T]) -> list[T]:
        """The page out of rows fetched with :func:`keyset` (``limit`` + 1); sets ``Link`` when more exist."""
        page = list(fetched[: self.limit])
        if len(fetched) > self.limit and page:
            last = page[-1].id  # type: ignore[attr-defined]
            url = self.request.url.include_query_params(limit=self.limit, after=last)
            self.response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
        return page


async def page_params(
    request: Request,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="rows per page")] = DEFAULT_LIMIT,
    after: Annotated[int | None, Query(ge=1, le=PG_INT_MAX,
                                       description="the last id of the previous page (keyset cursor)")] = None,
) -> Page:
    return Page(limit=limit, after=after, request=request, response=response)


PageDep = Annotated[Page, Depends(page_params)]


def keyset(stmt: S, id_column: InstrumentedAttribute[int], after: int | None, limit: int, *,
           descending: bool = False) -> S:
    """``stmt`` ordered by ``id_column``, rows after the cursor, ``limit`` + 1 of them (to see if more exist)."""
    if after is not None:
        stmt = stmt.where(id_column < after if descending else id_column > after)
    order = id_column.desc() if descending else id_column.asc()
    return stmt.order_by(order).limit(limit + 1)
