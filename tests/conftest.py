"""Shared fixtures: real PostgreSQL + Redis, a migrated database per session, clean state per test."""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.core.runtime import configure_process

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
CT_DIR = SAMPLES / "totalsegmentator"
SEED_DIR = SAMPLES / "seed"
ARTIFACTS = ROOT / "test-artifacts"

# This process runs LiteMedSAM in-process: spawn children, bounded OpenMP spinning, before torch loads.
configure_process(runs_models=True)

# Per-test limits by marker (the largest applies); a test's own @pytest.mark.timeout wins.
# pytest-timeout (signal method) fails the test with every thread's stack and the session goes on;
# if the main thread cannot run Python code (stuck in C), faulthandler's C watchdog dumps every
# thread's stack and ends the process HARD_STOP_GRACE_S later.
TIMEOUT_S = {"slow": 1200, "model": 600, "browser": 300}
FAST_TIMEOUT_S = 120
HARD_STOP_GRACE_S = 60


def timeout_for(item: pytest.Item) -> float:
    explicit = item.get_closest_marker("timeout")
    if explicit is not None and explicit.args:
        return float(explicit.args[0])
    return max([FAST_TIMEOUT_S] + [s for name, s in TIMEOUT_S.items() if item.get_closest_marker(name)])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout_for(item)))


def _stderr_fd(config: pytest.Config) -> int:
    """The terminal's stderr (pytest's faulthandler plugin keeps a dup that output capture does not touch)."""
    from _pytest.faulthandler import fault_handler_stderr_fd_key

    return config.stash.get(fault_handler_stderr_fd_key, 2)


def pytest_sessionstart(session: pytest.Session) -> None:
    """`make test` runs under `timeout`: its SIGTERM dumps every thread's stack before the process ends."""
    faulthandler.register(signal.SIGTERM, file=_stderr_fd(session.config), all_threads=True, chain=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    faulthandler.dump_traceback_later(timeout_for(item) + HARD_STOP_GRACE_S, exit=True,
                                      file=_stderr_fd(item.config))
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_configure(config: pytest.Config) -> None:
    """Point the app at the test servers before any app module caches settings."""
    from tests import services

    base = Path(os.environ.get("CROWDSAM_TEST_DIR", "/tmp")) / f"crowdsam-tests-{os.getpid()}"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    embedded = ROOT / "var" / "test-services"
    server = services.postgres_server_url(embedded)
    url = services.create_database(server)
    redis_base = services.redis_server_url(embedded)
    redis_url, redis_claim = services.claim_redis_db(redis_base)
    os.environ["DATABASE_URL"] = url
    os.environ["REDIS_URL"] = redis_url
    os.environ["CROWDSAM_DATA_DIR"] = str(base / "data")
    os.environ["CROWDSAM_ONNX_DIR"] = str(base / "onnx")  # one ONNX export per model for the whole session
    os.environ.pop("CROWDSAM_STORAGE_URL", None)
    config._crowdsam = (server, url, base, redis_base, redis_claim)  # type: ignore[attr-defined]

    from app import migrate

    migrate.upgrade(url)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = getattr(config, "_crowdsam", None)
    if state is None:
        return
    server, url, base, redis_base, redis_claim = state
    from app.core.db import get_engine
    from app.core.redis import get_redis
    from tests import services

    get_engine().dispose()
    services.drop_database(server, url)
    get_redis().flushdb()
    services.release_redis_db(redis_base, redis_claim)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_state() -> Iterator[None]:
    """Every test starts with empty tables, an empty Redis db and an empty store."""
    from sqlalchemy import text

    from app.core.db import get_engine
    from app.core.redis import get_redis
    from app.core.storage import get_storage
    from app.models import Base
    from app.volumes import slices

    # DELETE in reverse dependency order + sequence resets: ~10x faster than TRUNCATE on tiny tables.
    with get_engine().begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(text(f'DELETE FROM "{table.name}"'))
        sequences = conn.execute(text("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'")).scalars()
        for sequence in list(sequences):
            conn.execute(text(f'ALTER SEQUENCE "{sequence}" RESTART'))
    get_redis().flushdb()
    get_storage().clear()  # the local store dir, or every object under an S3 store's prefix
    slices._cache.clear()
    yield


@pytest.fixture
def client() -> Iterator[object]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@dataclass
class Tokens:
    admin: str
    researcher: str
    annotator: str
    annotator2: str

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, role)}"}


@pytest.fixture
def tokens() -> Tokens:
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope

    with session_scope() as session:
        made = {
            name: create_token(session, name, role)[1]
            for name, role in [
                ("admin", Role.admin),
                ("researcher", Role.researcher),
                ("annotator", Role.annotator),
                ("annotator2", Role.annotator),
            ]
        }
        session.commit()
    return Tokens(**made)


ABDOMEN_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}
TOTALSEG_MAP = {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver", "52": "aorta"}


@pytest.fixture
def dataset(client, tokens) -> dict:  # type: ignore[no-untyped-def]
    response = client.post(
        "/api/v1/datasets",
        json={"name": "abdomen", "labels": ABDOMEN_LABELS, "window": {"level": 40, "width": 400},
              "annotators": ["annotator", "annotator2"]},
        headers=tokens.headers("researcher"),
    )
    assert response.status_code == 201, response.text
    return response.json()


def upload(client, tokens, dataset_id: int, image: Path, reference: Path | None = None,  # type: ignore[no-untyped-def]
           case_id: str = "case1", split: str = "train", **form: str):
    files = {"image": (image.name, image.read_bytes(), "application/gzip")}
    if reference is not None:
        files["reference"] = (reference.name, reference.read_bytes(), "application/gzip")
    data = {"case_id": case_id, "split": split, **form}
    return client.post(
        f"/api/v1/datasets/{dataset_id}/volumes", files=files, data=data, headers=tokens.headers("researcher")
    )


@pytest.fixture
def sm_volume(client, tokens, dataset) -> dict:  # type: ignore[no-untyped-def]
    """``example_ct_sm`` with its reference (TotalSegmentator values mapped to the five organs)."""
    import json

    response = upload(
        client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
        case_id="sm", reference_map=json.dumps(TOTALSEG_MAP), reference_other="background",
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def run_jobs():  # type: ignore[no-untyped-def]
    """Drain RQ queues (default ``sam`` and ``cpu``) with a real in-process ``rq.SimpleWorker`` in burst mode.

    Call it as ``run_jobs()`` or ``run_jobs("sam")``; returns True when any job ran.
    """
    from rq import SimpleWorker

    from app.core.redis import get_queue, get_redis

    def drain(*queue_names: str) -> bool:
        queues = [get_queue(name) for name in (queue_names or ("sam", "cpu"))]
        return bool(SimpleWorker(queues, connection=get_redis()).work(burst=True))

    return drain


@pytest.fixture
def live_server() -> Iterator[str]:
    """The real app on a free port, served by uvicorn in a thread; yields its base URL."""
    import socket
    import threading

    import uvicorn

    from app.main import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=20)
