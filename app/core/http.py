"""HTTP conditional requests: the one ``If-None-Match`` matcher of the API (slices, masks, overlays)."""

from __future__ import annotations


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of ``etag`` against an ``If-None-Match`` list (``*`` matches anything).

    ``None`` or an empty header never matches; a ``W/`` prefix on a listed tag is ignored.
    """
    if not if_none_match:
        return False
    candidates = [c.strip() for c in if_none_match.split(",")]
    return "*" in candidates or etag in (c.removeprefix("W/") for c in candidates)
