"""Security headers on every response, and no token in the access log.

A pure ASGI middleware (no body buffering, one pass over the response headers). The pages load only
their own scripts and styles (``app/static``, no inline code), so ``default-src 'self'`` fits them
and the JSON API alike. The interactive docs (``/docs``, ``/redoc``) are FastAPI's HTML that loads
Swagger UI / ReDoc from a CDN with an inline bootstrap script: they get the same headers but a CSP
without ``default-src`` (framing, ``<base>`` and form targets still locked down).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# 'wasm-unsafe-eval' lets the pages compile WebAssembly (the vendored onnxruntime-web that runs SAM's prompt
# decoder, app/static/vendor/); it allows no JavaScript eval and no other origin.
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'")
DOCS_CSP = "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")


def security_headers(csp: str, hsts_seconds: int) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-security-policy", csp.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    ]
    if hsts_seconds > 0:
        headers.append((b"strict-transport-security", f"max-age={hsts_seconds}; includeSubDomains".encode()))
    return headers


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response (a header the route set itself is kept)."""

    def __init__(self, app: ASGIApp, hsts_seconds: int = 0) -> None:
        self.app = app
        self.default = security_headers(CSP, hsts_seconds)
        self.docs = security_headers(DOCS_CSP, hsts_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.docs if scope.get("path") in DOCS_PATHS else self.default

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in extra if item[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_TOKEN_IN_QUERY = re.compile(r"((?:^|[?&;#])(?:token|access_token|code)=)[^&;#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``/annotate?token=csam_x&dataset=1`` → ``/annotate?token=[redacted]&dataset=1``."""
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Access-log filter: a token someone still puts in a query string never reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args: Any = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        return True


def redact_access_log() -> None:
    """Install :class:`RedactTokens` on uvicorn's access logger (once per process)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokens) for f in logger.filters):
        logger.addFilter(RedactTokens())
