"""ASGI middleware that caps request bodies while they stream (no unbounded uploads).

Two limits, chosen per request before a byte of the body is read: multipart bodies of ``@heavy`` routes
(volume upload, YOLO import, evaluation upload) may reach ``CROWDSAM_MAX_UPLOAD_BYTES``; every other body
(JSON, forms of ordinary routes, anything sent to an unknown path) ``CROWDSAM_MAX_JSON_BYTES``, because it is
parsed whole in memory. A declared ``Content-Length`` above the limit is refused before reading; a chunked
body is refused as soon as the bytes read pass it.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.routing import Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.admission import Kind, RouteKinds

UPLOAD_SETTING = "CROWDSAM_MAX_UPLOAD_BYTES"
JSON_SETTING = "CROWDSAM_MAX_JSON_BYTES"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the streamed body passes the limit.

    An ``HTTPException`` on purpose: FastAPI turns any other exception raised while it parses a
    body into "400 There was an error parsing the body", but re-raises HTTP exceptions as they are.
    """

    def __init__(self, max_bytes: int, setting: str = UPLOAD_SETTING) -> None:
        super().__init__(status_code=413, detail=_too_large(max_bytes, setting))


def _too_large(max_bytes: int, setting: str) -> str:
    return f"request body exceeds the limit of {max_bytes} bytes ({setting})"


def is_upload(kind: Kind, content_type: bytes) -> bool:
    """Whether a request may send an upload-sized body: multipart to a heavy route."""
    return kind is Kind.heavy and content_type.lower().startswith(b"multipart/form-data")


class BodySizeLimitMiddleware:
    """``max_bytes`` for uploads (see :func:`is_upload`), ``max_json_bytes`` for every other body.

    Without ``router`` (or ``max_json_bytes``) every request gets ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_json_bytes: int | None = None,
                 router: Router | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = max_json_bytes
        self.kinds = RouteKinds(router) if router is not None else None

    def limit_for(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str]:
        """The request's body limit and the setting that sets it."""
        if self.kinds is None or self.max_json_bytes is None:
            return self.max_bytes, UPLOAD_SETTING
        path, root = scope["path"], scope.get("root_path", "")
        kind = self.kinds(scope["method"], path[len(root):] if root and path.startswith(root) else path)
        if is_upload(kind, headers.get(b"content-type", b"")):
            return self.max_bytes, UPLOAD_SETTING
        return self.max_json_bytes, JSON_SETTING

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limit, setting = self.limit_for(scope, headers)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit, setting)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._reject(send, limit, setting)

    async def _reject(self, send: Send, limit: int, setting: str) -> None:
        body = json.dumps({"detail": _too_large(limit, setting)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
