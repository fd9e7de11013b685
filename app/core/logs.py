"""Logging: text (laptops) or JSON lines (``CROWDSAM_LOG_FORMAT=json``) on stderr, with a request id.

Every record carries ``request_id`` (API: :class:`RequestIdMiddleware`) and ``job_id``/``kind`` (workers:
:func:`job_context`) from context variables, so a log line of a service, a repository or uvicorn's access
log during a request names the request. A JSON line::

    {"time": "2026-12-07T01:02:03.456Z", "level": "INFO", "logger": "crowdsam.jobs", "message": "...",
     "request_id": "5f0c…", "job_id": "export-12", "kind": "export"}

Tokens never reach a log: uvicorn's access log keeps :class:`app.core.headers.RedactTokens`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

FORMATS = ("text", "json")
HEADER = b"x-request-id"
REQUEST_ID_MAX = 128
_VALID_REQUEST_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{REQUEST_ID_MAX - 1}}}")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s%(context)s"

request_id: ContextVar[str | None] = ContextVar("crowdsam_request_id", default=None)
job: ContextVar[tuple[str, str] | None] = ContextVar("crowdsam_job", default=None)  # (job id, kind)


def current_request_id() -> str | None:
    return request_id.get()


@contextmanager
def job_context(job_id: str, kind: str) -> Iterator[None]:
    """Log records inside carry ``job_id`` and ``kind``."""
    token = job.set((job_id, kind))
    try:
        yield
    finally:
        job.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``job_id`` and ``kind`` (None when unset) and a text suffix ``context``."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid, running = request_id.get(), job.get()
        record.request_id = rid
        record.job_id, record.kind = running if running is not None else (None, None)
        parts = [f"request_id={rid}"] if rid else []
        if running is not None:
            parts.append(f"job={running[0]}")
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, context ids, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id", "kind"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {FORMATS}")
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(fmt: str | None = None, level: int = logging.INFO) -> None:
    """Root logger → one stderr handler in ``fmt`` (default ``CROWDSAM_LOG_FORMAT``); uvicorn's loggers propagate
    to it. Idempotent (replaces the handlers of the root logger)."""
    if fmt is None:
        from app.core.config import get_settings

        fmt = get_settings().log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def uvicorn_log_config(fmt: str) -> dict[str, Any]:
    """``uvicorn.run(log_config=...)``: every process of ``serve --workers N`` logs like :func:`configure_logging`."""
    formatters: dict[str, Any] = (
        {"default": {"()": "app.core.logs.JsonFormatter"}} if fmt == "json"
        else {"default": {"format": TEXT_FORMAT}}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "app.core.logs.ContextFilter"}},
        "formatters": formatters,
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "default", "filters": ["context"]}},
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {name: {"handlers": [], "propagate": True, "level": "INFO"}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def valid_request_id(value: str) -> bool:
    return _VALID_REQUEST_ID.fullmatch(value) is not None


class RequestIdMiddleware:
    """Keeps a well-formed incoming ``X-Request-ID`` (≤ 128 of ``A-Za-z0-9._:-``), else makes one; it is in every
    log record of the request and in the response's ``X-Request-ID`` (pure ASGI: responses still stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope.get("headers", []) if k == HEADER), b"")
        text = incoming.decode("latin-1")
        rid = text if valid_request_id(text) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                headers.append((HEADER, rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
