"""Admission control: a bounded FIFO in front of the app; overload and pool trouble answer 503, never 500."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import create_engine, text

from app.core.admission import Gate, Kind, Outcome, heavy
from app.core.config import get_settings
from app.core.services import database_url
from app.main import create_app


def test_gate_admits_in_arrival_order_and_sheds_past_the_queue() -> None:
    async def scenario() -> None:
        gate = Gate(limit=1, queue_limit=2, max_wait_s=5)
        assert (await gate.enter())[0] is Outcome.admitted
        order: list[str] = []

        async def wait(name: str) -> None:
            outcome, _ = await gate.enter()
            order.append(f"{name}:{outcome.value}")

        b = asyncio.create_task(wait("b"))
        await asyncio.sleep(0)
        c = asyncio.create_task(wait("c"))
        await asyncio.sleep(0)
        assert gate.queued == 2
        assert (await gate.enter())[0] is Outcome.shed  # queue full: no wait at all
        gate.leave()
        await b
        gate.leave()
        await c
        assert order == ["b:admitted", "c:admitted"]
        assert gate.in_flight == 1 and gate.queued == 0 and gate.shed == 1
        gate.leave()
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_writes_waiting_are_admitted_before_reads_each_in_arrival_order() -> None:
    async def scenario() -> None:
        gate = Gate(limit=1, queue_limit=10, max_wait_s=5)
        assert (await gate.enter())[0] is Outcome.admitted
        order: list[str] = []

        async def wait(name: str, urgent: bool) -> None:
            outcome, _ = await gate.enter(urgent=urgent)
            order.append(f"{name}:{outcome.value}")

        tasks = []
        for name, urgent in (("read1", False), ("write1", True), ("read2", False), ("write2", True)):
            tasks.append(asyncio.create_task(wait(name, urgent)))
            await asyncio.sleep(0)
        assert gate.queued == 4
        for task in (tasks[1], tasks[3], tasks[0], tasks[2]):
            gate.leave()
            await task
        assert order == ["write1:admitted", "write2:admitted", "read1:admitted", "read2:admitted"]
        gate.leave()
        assert gate.in_flight == 0 and gate.queued == 0

    asyncio.run(scenario())


def test_gate_sheds_after_the_longest_wait_and_forgets_clients_that_hung_up() -> None:
    async def scenario() -> None:
        gate = Gate(limit=1, queue_limit=10, max_wait_s=0.05)
        await gate.enter()
        assert (await gate.enter())[0] is Outcome.shed
        assert gate.overloaded and gate.retry_after_s() >= 1

        async def hangup() -> dict[str, str]:
            return {"type": "http.disconnect"}

        gate.max_wait_s = 5
        assert (await gate.enter(hangup))[0] is Outcome.gone
        assert gate.queued == 0
        gate.leave()  # the slot is free again, not handed to the client that left
        assert gate.in_flight == 0
        assert (await gate.enter())[0] is Outcome.admitted

    asyncio.run(scenario())


@pytest.fixture
def tight(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One ordinary request and one heavy request inside at a time, no queue."""
    monkeypatch.setenv("CROWDSAM_MAX_IN_FLIGHT", "1")
    monkeypatch.setenv("CROWDSAM_ADMISSION_QUEUE", "0")
    monkeypatch.setenv("CROWDSAM_MAX_UPLOADS", "1")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _blocking_app(release: threading.Event, entered: threading.Event) -> FastAPI:
    app = create_app()

    def block() -> dict[str, str]:
        entered.set()
        release.wait(20)
        return {"status": "done"}

    @heavy
    def upload() -> dict[str, str]:
        return block()

    app.add_api_route("/api/v1/test/block", block)
    app.add_api_route("/api/v1/test/upload", upload, methods=["POST"])
    return app


def test_overload_is_503_with_retry_after_and_health_bypasses(tight, tokens) -> None:
    release, entered = threading.Event(), threading.Event()
    app = _blocking_app(release, entered)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            inside = asyncio.create_task(http.get("/api/v1/test/block"))
            await asyncio.to_thread(entered.wait, 10)
            refused = await http.get("/api/v1/datasets", headers=tokens.headers("researcher"))
            assert refused.status_code == 503
            assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1
            assert "capacity" in refused.json()["detail"]
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "overloaded"
            assert ready.json()["admission"]["in_flight"] == 1
            assert ready.json()["admission"]["shed"] == 1
            release.set()
            assert (await inside).status_code == 200
            assert (await http.get("/api/v1/datasets", headers=tokens.headers("researcher"))).status_code == 200

    asyncio.run(scenario())


def test_heavy_requests_have_their_own_small_gate(tight, tokens) -> None:
    release, entered = threading.Event(), threading.Event()
    app = _blocking_app(release, entered)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            upload = asyncio.create_task(http.post("/api/v1/test/upload"))
            await asyncio.to_thread(entered.wait, 10)
            busy = await http.post("/api/v1/test/upload")
            assert busy.status_code == 503 and "uploads are busy" in busy.json()["detail"]
            assert "retry-after" in busy.headers
            # ordinary requests still get in while the upload runs
            assert (await http.get("/api/v1/datasets", headers=tokens.headers("researcher"))).status_code == 200
            release.set()
            assert (await upload).status_code == 200

    asyncio.run(scenario())


def test_pool_timeout_and_unreachable_database_are_503_not_500() -> None:
    app = create_app()

    def pool_timeout() -> None:
        engine = create_engine(database_url(), pool_size=1, max_overflow=0, pool_timeout=0.1)
        try:
            with engine.connect(), engine.connect():
                pass
        finally:
            engine.dispose()

    def unreachable() -> None:
        engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    app.add_api_route("/api/v1/test/pool", pool_timeout)
    app.add_api_route("/api/v1/test/down", unreachable)
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as http:
        for path in ("/api/v1/test/pool", "/api/v1/test/down"):
            response = http.get(path)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"].isdigit()
            assert "retry" in response.json()["detail"]


def test_lifespan_gives_every_admitted_request_a_thread() -> None:
    app = create_app()

    async def tokens_now() -> dict[str, float]:
        return {"tokens": anyio.to_thread.current_default_thread_limiter().total_tokens}

    app.add_api_route("/api/v1/test/threads", tokens_now)
    from fastapi.testclient import TestClient

    settings = get_settings()
    with TestClient(app) as http:
        assert http.get("/api/v1/test/threads").json()["tokens"] == settings.thread_tokens
    assert settings.thread_tokens >= settings.admission_limit + settings.max_uploads
    assert settings.admission_limit + settings.max_uploads < settings.pool_size


def test_pool_and_gate_follow_the_number_of_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROWDSAM_DB_CONNECTIONS", "40")
    monkeypatch.setenv("CROWDSAM_WEB_WORKERS", "4")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert settings.pool_size == 10
        assert settings.admission_limit == 10 - settings.max_uploads - 1
    finally:
        get_settings.cache_clear()


def test_heavy_work_runs_in_threads_and_heavy_routes_are_marked() -> None:
    """Sync endpoints run in the thread pool; the only async one hands its work to threads itself."""
    routes: dict[str, APIRoute] = {}
    for route in create_app().routes:
        contexts = getattr(route, "effective_route_contexts", None)  # FastAPI >= 0.16x wraps included routers
        for candidate in [c.original_route for c in contexts()] if callable(contexts) else [route]:
            if isinstance(candidate, APIRoute):
                routes[candidate.name] = candidate
    assert len(routes) > 30
    async_ones = {name for name, r in routes.items() if inspect.iscoroutinefunction(r.endpoint)}
    assert async_ones == {"create_evaluation"}
    for name in ("upload_volume", "import_yolo", "import_coco", "simulate", "create_evaluation", "segmentation_figure"):
        assert getattr(routes[name].endpoint, "__crowdsam_admission__", None) is Kind.heavy, name
    for name in ("healthz", "readyz", "static_asset", "annotate_page"):
        assert getattr(routes[name].endpoint, "__crowdsam_admission__", None) is Kind.exempt, name
