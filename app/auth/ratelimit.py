"""Per-token rate limits on write routes (GCRA in one Redis Lua call).

Every ``POST``/``PUT``/``PATCH``/``DELETE`` under ``/api/v1`` costs one round trip to Redis after the
token is known: a generic cell rate algorithm (a token bucket stored as one timestamp, the bucket's
"theoretical arrival time") per (token, route class) allows ``rate_limit_per_s`` writes per second
sustained and ``rate_limit_burst`` at once. Route classes: ``prompts`` (the crowd's boxes: every path
with ``/prompts``) and ``write`` (everything else), so a bulk of box posts never starves a
researcher's job submissions made with the same token. Over the limit → 429 + ``Retry-After`` and
``{"detail": …}``; nothing is stored.

Redis down or slow (0.25 s timeout) → the write goes through (fail open) and a warning is logged at
most every 10 s; after a failure the limiter is skipped for 1 s so an outage costs no timeout per
request. Fail open because prompts are still stored while Redis is down (DESIGN §9 Faults): a limiter
that answered 503 would turn a Redis outage into a crowd outage.
"""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from starlette.concurrency import run_in_threadpool

from app.auth.security import CurrentPrincipal
from app.core.config import get_settings
from app.core.errors import TooManyRequests
from app.core.services import redis_url

log = logging.getLogger("crowdsam.ratelimit")

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KEY = "crowdsam:rate:{token_id}:{route_class}"
REDIS_TIMEOUT_S = 0.25
SKIP_AFTER_FAILURE_S = 1.0
WARN_EVERY_S = 10.0

# KEYS[1] = bucket; ARGV = emission interval (ms per write), tolerance (ms: interval × burst).
# Returns 0 when admitted (and stores the new arrival time), else the milliseconds to wait.
_GCRA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tolerance - now
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return 0
"""


@lru_cache
def _client() -> Redis:
    """A client of its own with short timeouts and no retries (redis-py's default retries a refused
    connection for ~3 s): a Redis that is down or hung must not hold a write for long."""
    return Redis.from_url(redis_url(), socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                          retry=Retry(NoBackoff(), 0))


@lru_cache
def _script() -> Any:
    return _client().register_script(_GCRA)


class _Health:
    skip_until = 0.0
    warned_at = -math.inf


def route_class(path: str) -> str:
    return "prompts" if "/prompts" in path else "write"


def check(token_id: int, cls: str, per_s: float, burst: int) -> float:
    """Seconds to wait before this write is allowed (0 = allowed and counted). Fails open."""
    now = time.monotonic()
    if now < _Health.skip_until:
        return 0.0
    interval = 1000.0 / per_s
    try:
        wait_ms = int(_script()(keys=[KEY.format(token_id=token_id, route_class=cls)],
                                args=[f"{interval:.6f}", f"{interval * burst:.6f}"]))
    except RedisError as exc:
        _Health.skip_until = now + SKIP_AFTER_FAILURE_S
        if now - _Health.warned_at >= WARN_EVERY_S:
            _Health.warned_at = now
            log.warning("rate limits not enforced: Redis unreachable (%s: %s); writes are let through",
                        type(exc).__name__, exc)
        return 0.0
    return wait_ms / 1000.0


async def write_rate_limit(request: Request, principal: CurrentPrincipal) -> None:
    """Dependency of every ``/api/v1`` route: writes count against the token's rate; reads are free."""
    if request.method not in WRITE_METHODS:
        return
    settings = get_settings()
    if settings.rate_limit_per_s <= 0:
        return
    cls = route_class(request.url.path)
    wait = await run_in_threadpool(check, principal.token_id, cls, settings.rate_limit_per_s,
                                   settings.rate_limit_burst)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise TooManyRequests(
            f"too many writes with this token ({cls}: {settings.rate_limit_per_s:g}/s, burst "
            f"{settings.rate_limit_burst}); retry after {retry} s",
            headers={"Retry-After": str(retry)},
        )


def document_429(app: FastAPI, prefix: str) -> None:
    """Add the 429 answer to every write operation under ``prefix`` in the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith(prefix):
                continue
            for method, operation in operations.items():
                responses = operation.get("responses", {})
                if method.upper() in WRITE_METHODS and "401" in responses and "429" not in responses:
                    responses["429"] = {
                        **responses["401"],
                        "description": "Too many writes with this token (per-token rate limit), or another "
                                       "per-user limit; retry after Retry-After",
                    }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
