"""HTTP conditional requests (the one ``If-None-Match`` matcher of the API) and streamed stored files."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Response
from fastapi.responses import StreamingResponse

from app.core.storage import get_storage


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of ``etag`` against an ``If-None-Match`` list (``*`` matches anything).

    ``None`` or an empty header never matches; a ``W/`` prefix on a listed tag is ignored.
    """
    if not if_none_match:
        return False
    candidates = [c.strip() for c in if_none_match.split(",")]
    return "*" in candidates or etag in (c.removeprefix("W/") for c in candidates)


def stored_file(key: str, *, media_type: str, headers: dict[str, str] | None = None, etag: str | None = None,
                if_none_match: str | None = None) -> Response:
    """One stored object streamed in 1 MiB reads with its ``Content-Length`` (exports, decoders, trainings);
    with ``etag``, a matching ``If-None-Match`` gets 304 and no body."""
    headers = dict(headers or {})
    if etag is not None:
        headers["ETag"] = etag
        if etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
    storage = get_storage()
    size = storage.size(key)
    handle = storage.open(key)

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(chunks(), media_type=media_type, headers={**headers, "Content-Length": str(size)})
