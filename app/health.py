"""Liveness and readiness; both bypass admission control so they answer under any load."""

from __future__ import annotations

import threading
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.core.admission import Admission, exempt
from app.core.db import get_engine
from app.core.redis import get_redis
from app.core.storage import StorageUnavailable, get_storage

router = APIRouter(tags=["health"])

CHECK_TTL_S = 1.0  # probes in a burst share one check: at most one connection for health at a time
_check_lock = threading.Lock()
_last_check: tuple[float, dict[str, str]] = (-CHECK_TTL_S, {})


@router.get("/healthz")
@exempt
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _backing_services() -> dict[str, str]:
    global _last_check
    with _check_lock:
        checked_at, checks = _last_check
        if time.monotonic() - checked_at < CHECK_TTL_S:
            return checks
        checks = {}
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            get_redis().ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        try:
            get_storage().check()
            checks["storage"] = "ok"
        except StorageUnavailable as exc:
            checks["storage"] = f"error: {exc}"
        except Exception as exc:
            checks["storage"] = f"error: {type(exc).__name__}"
        _last_check = (time.monotonic(), checks)
        return checks


@router.get(
    "/readyz",
    responses={503: {"description": "a backing service is unreachable or the API is shedding load (same body)"}},
)
@exempt
def readyz(request: Request) -> JSONResponse:
    """PostgreSQL, Redis and the artefact store are reachable and the API is not shedding load (admission state
    included)."""
    checks = _backing_services()
    admission: Admission = request.app.state.admission
    if any(v != "ok" for v in checks.values()):
        status = "unavailable"
    else:
        status = "overloaded" if admission.overloaded else "ok"
    return JSONResponse({"status": status, **checks, "admission": admission.state()},
                        status_code=200 if status == "ok" else 503)
