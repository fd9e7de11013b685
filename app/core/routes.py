"""The app's routes as one flat list of full path templates (admission classes, metric labels)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from starlette.routing import Router


def flat_routes(router: Router) -> Iterator[tuple[str, Any]]:
    """``(full path template, route)`` of every route. FastAPI >= 0.16x keeps included routers as wrappers:
    their ``effective_route_contexts`` give the full paths (with the ``/api/v1`` prefix)."""
    for route in router.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            for context in contexts():
                if context.path is not None:
                    yield context.path, context.original_route
        elif (path := getattr(route, "path", None)) is not None:
            yield path, route


def route_methods(route: Any) -> frozenset[str] | None:
    """The HTTP methods a route answers; None = any (mounts, websockets)."""
    methods = getattr(route, "methods", None)
    return frozenset(methods) if methods else None
