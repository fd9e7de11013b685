"""Application factory: routers, error handlers, body limits, admission control."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth.ratelimit import document_429, write_rate_limit
from app.auth.router import router as auth_router
from app.core.admission import Admission, AdmissionMiddleware, configure_threads
from app.core.config import get_settings
from app.core.errors import CrowdsamError
from app.core.headers import SecurityHeadersMiddleware, redact_access_log
from app.core.limits import BodySizeLimitMiddleware
from app.core.logs import RequestIdMiddleware, current_request_id
from app.core.metrics import HTTPMetricsMiddleware
from app.core.responses import API_ERRORS, errors
from app.crowd.router import router as crowd_router
from app.datasets.access import dataset_access
from app.datasets.router import router as datasets_router
from app.evaluations.router import router as evaluations_router
from app.exports.router import router as exports_router
from app.health import router as health_router
from app.operations import router as operations_router
from app.prompts.router import router as prompts_router
from app.segmentations.embeddings import router as embeddings_router
from app.segmentations.router import router as segmentations_router
from app.tasks.router import router as tasks_router
from app.trainings.router import router as trainings_router
from app.volumes.router import router as volumes_router
from app.web.router import router as web_router

log = logging.getLogger("crowdsam")

API_PREFIX = "/api/v1"
RETRY_AFTER_S = 2
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
API_ROUTERS = [
    auth_router,
    datasets_router,
    volumes_router,
    prompts_router,
    tasks_router,
    segmentations_router,
    embeddings_router,
    exports_router,
    evaluations_router,
    trainings_router,
    crowd_router,
]


def create_app() -> FastAPI:
    settings = get_settings()
    admission = Admission.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        configure_threads(admission.thread_tokens)  # every admitted request always finds a thread
        yield

    app = FastAPI(
        title="crowdsam",
        version="0.1.0",
        description="Crowd-sourced boxes on CT slices → 3D organ masks with SAM; nnU-Net export and evaluation.",
        lifespan=lifespan,
    )
    app.state.admission = admission
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       max_json_bytes=settings.max_json_bytes, router=app.router)  # per route kind
    app.add_middleware(AdmissionMiddleware, admission=admission, router=app.router)
    app.add_middleware(SecurityHeadersMiddleware, hsts_seconds=settings.hsts_seconds)  # every answer
    app.add_middleware(HTTPMetricsMiddleware, router=app.router)  # counts 413/503 answers of the gates too
    app.add_middleware(RequestIdMiddleware)  # outermost: every log line of the request and every answer
    redact_access_log()  # a token in a query string never reaches uvicorn's access log
    app.include_router(health_router)
    app.include_router(operations_router)  # GET /metrics (Prometheus, Staff token)
    app.include_router(web_router)  # browser pages (/annotate, /review/{id}) and their static assets
    for router in API_ROUTERS:
        app.include_router(router, prefix=API_PREFIX, responses=errors(*API_ERRORS),
                           dependencies=[Depends(write_rate_limit), Depends(dataset_access)])
    document_429(app, API_PREFIX)  # writes may answer 429 (per-token rate limit)
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CrowdsamError)
    async def crowdsam_error(_: Request, exc: CrowdsamError) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 503:
            # "Retry shortly", like every other 503 of the API (overload, a backing service down).
            log.warning("service unavailable: %s", exc.detail)
            headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        elif exc.status_code >= 500:
            log.error("unhandled service error: %s", exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DataError)
    async def data_error(_: Request, exc: DataError) -> JSONResponse:
        # A value PostgreSQL cannot store (an integer past its column's range, a NUL in text): the input's fault.
        log.info("rejected input the database cannot store: %s", exc.orig)
        return JSONResponse({"detail": f"a value is out of range or not storable: {exc.orig}"}, status_code=422)

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Overload or a database/Redis hiccup is "try again shortly", never a 500.
        log.warning("service unavailable: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"detail": f"a backing service is busy or unreachable ({type(exc).__name__}); retry"},
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    for exc_class in (PoolTimeout, OperationalError, psycopg.OperationalError, RedisConnectionError,
                      RedisTimeoutError):
        app.add_exception_handler(exc_class, unavailable)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse({"detail": "internal server error", "request_id": current_request_id()}, status_code=500)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in NO_SPACE_ERRNOS:
            # A full disk (or quota) under the store or the upload spool: the server's problem, not the input's;
            # the request stored nothing (uploads remove what they wrote), so it can be sent again once there is room.
            log.error("out of storage space: %s", exc)
            return JSONResponse({"detail": "insufficient storage: no space left on the server's disk; nothing was "
                                           "stored, retry once space has been freed"}, status_code=507)
        return await unexpected(request, exc)


app = create_app()
