"""Admission control: at most N requests inside the app at once; the rest wait briefly in a FIFO, or get 503.

Why: every step of a request (session, token lookup, role check, handler) runs in anyio's thread pool,
and a request holds a pooled connection from its first query until its commit. With more requests
inside than threads or connections, holders of one wait for the other and a burst ends in 30 s pool
timeouts (500s). This pure-ASGI gate runs before any sync dependency and admits at most
``admission_limit`` ordinary requests plus ``max_uploads`` heavy ones per process; both together stay
below the pool size and the thread tokens (set at start-up by :func:`configure_threads`), so an
admitted request always finds a thread and a connection. The others wait in async FIFOs (a future
each; writes before reads) for at most ``admission_wait_s``; past the queue's length or that wait they get 503 with
``Retry-After`` — overload never becomes a 500. Heavy routes (uploads, imports, simulations) take
a slot of their own small gate, without a queue. Health, docs, static files and unknown paths bypass.

Small request bodies are read before the request queues, so a client that hangs up while waiting
(a cut-off request) leaves the queue without ever reaching the app. A request's slot is freed when
its response starts: by then its session has committed and returned its connection.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, TypeVar

import anyio.to_thread
from fastapi.routing import APIRoute
from starlette.routing import Router, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import Settings
from app.core.routes import flat_routes, route_methods

READS = frozenset({"GET", "HEAD", "OPTIONS"})  # the rest are writes: admitted first when requests queue
PREBUFFER_BYTES = 1 << 20  # bodies up to this size are read before the request queues
OVERLOADED_FOR_S = 5.0  # /readyz says "overloaded" this long after a request was shed
_ATTR = "__crowdsam_admission__"
F = TypeVar("F", bound=Callable[..., Any])


class Kind(StrEnum):
    exempt = "exempt"  # no session, no queue: health, docs, static files
    normal = "normal"
    heavy = "heavy"  # big uploads and CPU-heavy work: a small gate of their own


def admission(kind: Kind) -> Callable[[F], F]:
    """Mark an endpoint's admission class (put it *below* the route decorator)."""

    def mark(func: F) -> F:
        setattr(func, _ATTR, kind)
        return func

    return mark


exempt = admission(Kind.exempt)
heavy = admission(Kind.heavy)


class Outcome(Enum):
    admitted = "admitted"
    shed = "shed"
    gone = "gone"  # the client hung up while waiting


class Gate:
    """A counting gate with a bounded queue of waiters; lives on one event loop.

    Two FIFOs: a freed slot goes to the oldest *urgent* waiter first (writes: the crowd's boxes and
    "nothing here"), then to the oldest other one (reads: tasks, slice images). Under overload the
    work annotators already did is stored first and new work is handed out more slowly.
    """

    def __init__(self, limit: int, queue_limit: int, max_wait_s: float) -> None:
        self.limit, self.queue_limit, self.max_wait_s = limit, queue_limit, max_wait_s
        self.in_flight = 0
        self.queued = 0
        self.shed = 0
        self.admitted = 0
        self.last_shed = -math.inf
        self.service_s = 0.05  # moving average of time inside, for Retry-After
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def enter(
        self, hangup: Callable[[], Awaitable[Message]] | None = None, *, urgent: bool = False
    ) -> tuple[Outcome, Message | None]:
        """Admit now, after a wait, or not; ``hangup`` (a ``receive``) is watched while waiting.

        Returns the outcome and a message ``hangup`` produced that was not a disconnect (to replay).
        """
        if self.in_flight < self.limit and not self.queued:
            self.in_flight += 1
            self.admitted += 1
            return Outcome.admitted, None
        if self.queued >= self.queue_limit:
            self._shed()
            return Outcome.shed, None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._waiters).append(waiter)
        self.queued += 1
        watcher = asyncio.ensure_future(hangup()) if hangup is not None else None
        try:
            watched: list[asyncio.Future[Any]] = [waiter] if watcher is None else [waiter, watcher]
            await asyncio.wait(watched, timeout=self.max_wait_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (server shutting down): pass on a slot we were handed
            self._abandon(waiter)
            raise
        finally:
            self.queued -= 1
            if watcher is not None and not watcher.done():
                watcher.cancel()
        message: Message | None = None
        if watcher is not None and watcher.done() and not watcher.cancelled():
            message = {"type": "http.disconnect"} if watcher.exception() is not None else watcher.result()
        if message is not None and message["type"] == "http.disconnect":
            self._abandon(waiter)
            return Outcome.gone, None
        if waiter.done():
            self.admitted += 1
            return Outcome.admitted, message
        waiter.cancel()
        self._shed()
        return Outcome.shed, message

    def leave(self, service_s: float | None = None) -> None:
        """Free a slot: hand it to the oldest live urgent waiter, else the oldest live waiter, else count it free."""
        if service_s is not None:
            self.service_s += 0.1 * (service_s - self.service_s)
        for waiters in (self._urgent, self._waiters):
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.in_flight -= 1

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self.leave()
        else:
            waiter.cancel()

    def _shed(self) -> None:
        self.shed += 1
        self.last_shed = time.monotonic()

    def retry_after_s(self) -> int:
        """Seconds until the queue has probably drained (1 to 30)."""
        drain = (self.queued + 1) * self.service_s / max(self.limit, 1)
        return int(min(30, max(1, math.ceil(drain))))

    @property
    def overloaded(self) -> bool:
        return time.monotonic() - self.last_shed < OVERLOADED_FOR_S or (
            self.queue_limit > 0 and self.queued >= self.queue_limit
        )

    def state(self) -> dict[str, Any]:
        return {"limit": self.limit, "in_flight": self.in_flight, "queued": self.queued,
                "queue_limit": self.queue_limit, "admitted": self.admitted, "shed": self.shed}


@dataclass
class Admission:
    """The gates of one app instance (``app.state.admission``) and how routes map onto them."""

    normal: Gate
    heavy: Gate
    thread_tokens: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Admission:
        return cls(
            normal=Gate(settings.admission_limit, settings.admission_queue, settings.admission_wait_s),
            heavy=Gate(settings.max_uploads, 0, settings.admission_wait_s),
            thread_tokens=settings.thread_tokens,
        )

    @property
    def overloaded(self) -> bool:
        return self.normal.overloaded

    def state(self) -> dict[str, Any]:
        return {"status": "overloaded" if self.overloaded else "ok", **self.normal.state(),
                "heavy": self.heavy.state(), "thread_tokens": self.thread_tokens}


def configure_threads(tokens: int) -> None:
    """Give anyio's default thread limiter exactly ``tokens`` threads (call on the server's event loop)."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = tokens


class RouteKinds:
    """Method + path → the admission class of the endpoint the router will pick (exempt when none).

    Walks the app's routes once (:func:`app.core.routes.flat_routes`) and again when routes are added; answers
    are cached per (method, path).
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self._table: list[tuple[re.Pattern[str], frozenset[str] | None, Kind]] = []
        self._built_for = -1
        self._cache: dict[tuple[str, str], Kind] = {}

    def _build(self) -> None:
        routes = flat_routes(self.router)
        table = [(compile_path(path)[0], route_methods(route), _kind(route)) for path, route in routes]
        self._table, self._built_for = table, len(self.router.routes)
        self._cache.clear()

    def __call__(self, method: str, path: str) -> Kind:
        if self._built_for != len(self.router.routes):
            self._build()
        kind = self._cache.get((method, path))
        if kind is None:
            kind = next((k for regex, methods, k in self._table
                         if regex.match(path) and (methods is None or method in methods)), Kind.exempt)
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[(method, path)] = kind
        return kind


def _kind(route: Any) -> Kind:
    """An endpoint's admission class (``@heavy``/``@light`` mark it); exempt for mounts and static files."""
    default = Kind.normal if isinstance(route, APIRoute) else Kind.exempt
    return getattr(getattr(route, "endpoint", None), _ATTR, default)


def unavailable_body(detail: str) -> bytes:
    return json.dumps({"detail": detail}).encode()


async def send_503(send: Send, detail: str, retry_after_s: int) -> None:
    body = unavailable_body(detail)
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after_s).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


async def _prebuffer(receive: Receive) -> tuple[list[Message], bool]:
    """Read the body while it is small; returns the messages and whether the body is complete."""
    messages: list[Message] = []
    size = 0
    while size <= PREBUFFER_BYTES:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, True  # a disconnect: nothing more will come
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, True
    return messages, False


class AdmissionMiddleware:
    """The gate in front of the app (outermost middleware)."""

    def __init__(self, app: ASGIApp, admission: Admission, router: Router) -> None:
        self.app, self.admission, self.kinds = app, admission, RouteKinds(router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "")
        kind = self.kinds(scope["method"], path[len(root):] if root and path.startswith(root) else path)
        if kind is Kind.exempt:
            await self.app(scope, receive, send)
            return
        gate = self.admission.heavy if kind is Kind.heavy else self.admission.normal
        buffered: deque[Message] = deque()
        hangup: Callable[[], Awaitable[Message]] | None = None
        if kind is Kind.normal:
            messages, complete = await _prebuffer(receive)
            if messages[-1]["type"] == "http.disconnect":
                return  # the client left before the request could run
            buffered.extend(messages)
            hangup = receive if complete else None
        outcome, extra = await gate.enter(hangup, urgent=scope["method"] not in READS)
        if extra is not None:
            buffered.append(extra)
        if outcome is Outcome.gone:
            return
        if outcome is Outcome.shed:
            what = "uploads are busy" if kind is Kind.heavy else "the service is at capacity"
            await send_503(send, f"{what}; retry after the Retry-After delay", gate.retry_after_s())
            return

        started = time.monotonic()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                gate.leave(time.monotonic() - started)

        async def replay() -> Message:
            return buffered.popleft() if buffered else await receive()

        async def releasing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()  # the session has committed and returned its connection
            await send(message)

        try:
            await self.app(scope, replay, releasing_send)
        finally:
            release()
