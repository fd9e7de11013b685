"""Crowd load: many annotators with think time against a real ``crowdsam serve``, a SAM worker beside it.

Each simulated annotator does what the labeling page does (``app/static/js/annotate.js``): ask for
the next task, fetch its slice PNG, look, then either report "nothing here" (``seen`` without boxes)
or draw boxes — posted one per request as they are drawn, or all at once on submit (bulk). Every
``--cut-every``-th request is cut off by the client (a very short timeout closes the connection);
cut requests and 5xx answers are retried with the same body and client_ids, 503s after their
``Retry-After``. At the end the database is checked against what the clients sent:

- lost: a client_id acknowledged with 2xx that is not stored (or stored with other values), or an
  acknowledged "nothing here" whose slice view is missing;
- duplicated: stored copies beyond one per client_id, plus stored rows no client sent.

Standalone it creates a scratch database (``TEST_DATABASE_URL``, a local server on :5432, or the
embedded test cluster), a Redis db of its own and a temporary data dir, so it never touches real
data; the last line of output is always
``crowd_load clients=N requests=R 5xx=E lost=L duplicated=D p99_post_ms=P``.

    .venv/bin/python bench/crowd_load.py [--clients 500] [--tokens 50] [--duration 60] [--think 3]
        [--no-worker] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from app.core.runtime import stop_process  # noqa: E402

CT_DIR = ROOT / "data" / "samples" / "totalsegmentator"
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}
TOTALSEG_MAP = {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver", "52": "aorta"}
CUT = 0  # status recorded for a request the client cut off
TRANSPORT_ERROR = -1  # connection refused/reset without a cut-off by the client


@dataclass
class LoadConfig:
    """What the crowd does."""

    clients: int = 500
    actions: int | None = None  # tasks per client; None: until ``duration_s``
    duration_s: float = 60.0
    think_s: float = 3.0  # mean seconds an annotator looks at a slice or draws one box
    cut_every: int = 7
    bulk_share: float = 0.5  # tasks submitted in one request (as the web page does) vs box by box
    nothing_share: float = 0.2  # tasks answered "nothing here"
    max_boxes: int = 3
    max_attempts: int = 40
    timeout_s: float = 60.0
    seed: int = 0


@dataclass
class Sent:
    annotator: str
    volume_id: int
    slice: int
    label: str
    box: tuple[float, float, float, float]


@dataclass
class Ledger:
    """What the clients sent, what the server acknowledged, what was retried."""

    boxes: dict[tuple[str, str], Sent] = field(default_factory=dict)  # (annotator, client_id) → box
    acked: set[tuple[str, str]] = field(default_factory=set)
    retried: set[tuple[str, str]] = field(default_factory=set)
    seen_acked: set[tuple[str, int, int]] = field(default_factory=set)  # (annotator, volume, slice)
    bad_answers: list[str] = field(default_factory=list)


@dataclass
class Stats:
    samples: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    gave_up: int = 0
    tasks: int = 0
    no_task: int = 0
    started: float = 0.0
    elapsed_s: float = 0.0

    def record(self, route: str, status: int, latency_s: float) -> None:
        self.samples[route].append((status, latency_s))

    @property
    def requests(self) -> int:
        return sum(len(s) for s in self.samples.values())

    @property
    def errors_5xx(self) -> int:
        return sum(1 for s in self.samples.values() for status, _ in s if status >= 500)

    def latencies(self, routes: list[str]) -> list[float]:
        return sorted(lat for r in routes for status, lat in self.samples.get(r, []) if status > 0)


POST_ROUTES = ["POST prompts (1 box)", "POST prompts (bulk)", "POST prompts (nothing here)"]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Annotator:
    """One labeling front end: its own connections, token, random stream and request counter."""

    def __init__(self, index: int, base: str, name: str, token: str, dataset_id: int, cfg: LoadConfig,
                 stats: Stats, ledger: Ledger, ssl_context: ssl.SSLContext) -> None:
        self.base, self.name, self.dataset_id, self.cfg = base, name, dataset_id, cfg
        self.stats, self.ledger = stats, ledger
        self.rng = random.Random(cfg.seed * 1_000_003 + index)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = httpx.AsyncClient(base_url=base, verify=ssl_context, timeout=cfg.timeout_s,
                                      limits=httpx.Limits(max_connections=2, max_keepalive_connections=2))
        self.requests = 0

    async def think(self, factor: float = 1.0) -> None:
        await asyncio.sleep(self.cfg.think_s * factor * self.rng.uniform(0.5, 1.5))

    async def call(self, route: str, method: str, url: str, body: dict[str, Any] | None = None,
                   keys: list[tuple[str, str]] | None = None) -> httpx.Response | None:
        """Send until answered below 500 (cut-offs, 5xx and 503 are retried); None when it gives up."""
        for _attempt in range(self.cfg.max_attempts):
            self.requests += 1
            cut = self.cfg.cut_every > 0 and self.requests % self.cfg.cut_every == 0
            timeout = self.rng.uniform(0.001, 0.02) if cut else self.cfg.timeout_s
            started = time.perf_counter()
            try:
                response = await self.http.request(method, url, json=body, headers=self.headers, timeout=timeout)
            except httpx.TransportError:
                self.stats.record(route, CUT if cut else TRANSPORT_ERROR, time.perf_counter() - started)
                self.ledger.retried.update(keys or [])
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                continue
            self.stats.record(route, response.status_code, time.perf_counter() - started)
            if response.status_code < 500:
                return response
            self.ledger.retried.update(keys or [])
            retry_after = response.headers.get("retry-after", "")
            delay = float(retry_after) if retry_after.isdigit() else 1.0
            await asyncio.sleep(delay * self.rng.uniform(1.0, 1.5))
        self.stats.gave_up += 1
        return None

    async def run(self, deadline: float) -> None:
        try:
            await self.think()  # arrivals spread out: reading the instructions
            done = 0
            idle = 0
            while (self.cfg.actions is None or done < self.cfg.actions) and time.monotonic() < deadline:
                response = await self.call("GET /tasks/next", "GET",
                                           f"/api/v1/tasks/next?dataset={self.dataset_id}")
                if response is None:
                    continue
                if response.status_code == 204:
                    self.stats.no_task += 1
                    idle += 1
                    if idle >= 3:
                        return  # nothing left for this annotator
                    await self.think()
                    continue
                if response.status_code != 200:
                    self.ledger.bad_answers.append(f"tasks/next {response.status_code} {response.text[:200]}")
                    return
                idle = 0
                await self.label(response.json())
                done += 1
                self.stats.tasks += 1
        finally:
            await self.http.aclose()

    async def label(self, task: dict[str, Any]) -> None:
        png = await self.call("GET slice.png", "GET", task["slice_url"])
        if png is not None and png.status_code != 200:
            self.ledger.bad_answers.append(f"slice png {png.status_code}")
        await self.think()
        volume_id, k = task["volume_id"], task["slice"]
        url = f"/api/v1/volumes/{volume_id}/prompts"
        if self.rng.random() < self.cfg.nothing_share:
            await self.post("POST prompts (nothing here)", url, volume_id, k, [])
            return
        width, height = task["display_size"]
        boxes = [self.draw(volume_id, k, list(task["labels"]), width, height)
                 for _ in range(self.rng.randint(1, self.cfg.max_boxes))]
        if self.rng.random() < self.cfg.bulk_share:
            await self.think(len(boxes))
            await self.post("POST prompts (bulk)", url, volume_id, k, boxes)
        else:
            for box in boxes:
                await self.think()
                await self.post("POST prompts (1 box)", url, volume_id, k, [box])

    def draw(self, volume_id: int, k: int, labels: list[str], width: int, height: int) -> tuple[str, Sent]:
        x0, y0 = self.rng.uniform(0, width - 2), self.rng.uniform(0, height - 2)
        box = (round(x0, 2), round(y0, 2), round(self.rng.uniform(x0 + 1, width), 2),
               round(self.rng.uniform(y0 + 1, height), 2))
        return str(uuid.uuid4()), Sent(self.name, volume_id, k, self.rng.choice(labels), box)

    async def post(self, route: str, url: str, volume_id: int, k: int, boxes: list[tuple[str, Sent]]) -> None:
        keys = [(self.name, cid) for cid, _ in boxes]
        for cid, sent in boxes:
            self.ledger.boxes[(self.name, cid)] = sent
        body = {"boxes": [{"slice": s.slice, "label": s.label, "box": list(s.box), "client_id": cid}
                          for cid, s in boxes], "points": [], "seen": [k]}
        response = await self.call(route, "POST", url, body, keys)
        if response is None:
            return
        if response.status_code != 201:
            self.ledger.bad_answers.append(f"{route} {response.status_code} {response.text[:200]}")
            return
        answer = response.json()
        if len(answer["ids"]) != len(boxes) or k not in answer["seen"]:
            self.ledger.bad_answers.append(f"{route}: answer does not match the request: {answer}")
            return
        self.ledger.acked.update(keys)
        self.ledger.seen_acked.add((self.name, volume_id, k))


async def run_load(base: str, tokens: list[tuple[str, str]], dataset_id: int, cfg: LoadConfig) -> tuple[Stats,
                                                                                                          Ledger]:
    """Run ``cfg.clients`` annotators (client i uses token i mod len(tokens)) against ``base``."""
    stats, ledger = Stats(), Ledger()
    context = ssl.create_default_context()  # one for all clients: building one each costs ~10 ms
    annotators = [Annotator(i, base, *tokens[i % len(tokens)], dataset_id, cfg, stats, ledger, context)
                  for i in range(cfg.clients)]
    stats.started = time.monotonic()
    deadline = stats.started + (cfg.duration_s if cfg.actions is None else 24 * 3600)
    await asyncio.gather(*(a.run(deadline) for a in annotators))
    stats.elapsed_s = time.monotonic() - stats.started
    return stats, ledger


def verify(dsn: str, ledger: Ledger, annotators: list[str]) -> tuple[int, int]:
    """(lost, duplicated) of the annotators' prompts and views, from the database."""
    lost = duplicated = 0
    stored: dict[tuple[str, str], list[tuple[int, int, str, tuple[float, ...]]]] = defaultdict(list)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT annotator, client_id::text, volume_id, slice_index, label, x0, y0, x1, y1 FROM prompts "
            "WHERE annotator = ANY(%s)", (annotators,)).fetchall()
        views = set(conn.execute("SELECT annotator, volume_id, slice_index FROM slice_views "
                                 "WHERE annotator = ANY(%s)", (annotators,)).fetchall())
    for annotator, client_id, volume_id, k, label, *box in rows:
        stored[(annotator, client_id)].append((volume_id, k, label, tuple(box)))
    for key, copies in stored.items():
        duplicated += len(copies) - 1
        if key not in ledger.boxes:
            duplicated += 1  # stored, yet no client sent it
    for key in ledger.acked:
        sent = ledger.boxes[key]
        copies = stored.get(key, [])
        if not any(c == (sent.volume_id, sent.slice, sent.label, sent.box) for c in copies):
            lost += 1
    lost += len(ledger.seen_acked - views)
    return lost, duplicated


def report(stats: Stats, ledger: Ledger, lost: int, duplicated: int, clients: int) -> list[str]:
    """Per-route table, then the summary line (always last)."""
    lines = [f"{'route':30s} {'n':>6s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
             f"{'2xx':>6s} {'503':>5s} {'5xx':>4s} {'cut':>5s} {'neterr':>6s}"]
    for route in sorted(stats.samples):
        samples = stats.samples[route]
        lat = stats.latencies([route])
        statuses = [s for s, _ in samples]
        lines.append(
            f"{route:30s} {len(samples):6d} {len(samples) / max(stats.elapsed_s, 1e-9):7.1f} "
            f"{percentile(lat, 50) * 1e3:8.1f} {percentile(lat, 95) * 1e3:8.1f} {percentile(lat, 99) * 1e3:8.1f} "
            f"{sum(200 <= s < 300 for s in statuses):6d} {statuses.count(503):5d} "
            f"{sum(s >= 500 and s != 503 for s in statuses):4d} {statuses.count(CUT):5d} "
            f"{statuses.count(TRANSPORT_ERROR):6d}")
    total = stats.requests
    lines.append(f"{stats.tasks} tasks, {len(ledger.boxes)} boxes sent, {len(ledger.acked)} acknowledged, "
                 f"{len(ledger.retried)} retried, {len(ledger.seen_acked)} slices reported seen; "
                 f"{total} requests in {stats.elapsed_s:.1f}s ({total / max(stats.elapsed_s, 1e-9):.1f}/s); "
                 f"gave up {stats.gave_up}; no task left {stats.no_task}")
    for bad in ledger.bad_answers[:5]:
        lines.append(f"unexpected answer: {bad}")
    p99_post = percentile(stats.latencies(POST_ROUTES), 99) * 1e3
    lines.append(f"crowd_load clients={clients} requests={total} 5xx={stats.errors_5xx} lost={lost} "
                 f"duplicated={duplicated} p99_post_ms={0 if math.isnan(p99_post) else round(p99_post)}")
    return lines


# --- set-up shared by the standalone bench and tests/test_crowd_load.py ------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running ``crowdsam serve``: its base URL and process."""

    base: str
    proc: subprocess.Popen[bytes]

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server and its worker processes (Linux /proc; NaN elsewhere)."""
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            pids += [int(c) for c in children]
        total = 0.0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                return math.nan
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


@contextlib.contextmanager
def serve(env: Mapping[str, str], workers: int = 1, log: Path | None = None) -> Iterator[Server]:
    """``crowdsam serve`` in a subprocess (schema already migrated), until the block ends."""
    port = free_port()
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--no-migrate", "--no-access-log"],
        cwd=ROOT, env=dict(env), stdout=out, stderr=out,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"crowdsam serve did not start (exit code {proc.returncode})")
            time.sleep(0.2)
        yield Server(base, proc)
    finally:
        stop_process(proc, timeout=30)
        if log is not None and hasattr(out, "close"):
            out.close()


def make_tokens(n_annotators: int, prefix: str = "crowd") -> tuple[str, list[tuple[str, str]]]:
    """A researcher token and ``n_annotators`` (name, token) annotator pairs, straight in the database."""
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope

    with session_scope() as session:
        researcher = create_token(session, f"{prefix}-researcher", Role.researcher)[1]
        annotators = [(f"{prefix}-{i:03d}", create_token(session, f"{prefix}-{i:03d}", Role.annotator)[1])
                      for i in range(n_annotators)]
        session.commit()
    return researcher, annotators


def create_dataset(base: str, researcher: str, name: str, image: Path, copies: int,
                   window: tuple[float, float] = (40.0, 400.0), reference: bool = False,
                   annotators: list[str] | None = None) -> tuple[int, list[int]]:
    """A dataset with ``copies`` uploads of ``image`` (optionally with its reference) that ``annotators``
    (token names) may label; (dataset, volumes)."""
    headers = {"Authorization": f"Bearer {researcher}"}
    with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
        response = http.post("/api/v1/datasets", json={"name": name, "labels": LABELS,
                                                        "window": {"level": window[0], "width": window[1]},
                                                        "annotators": annotators or []})
        response.raise_for_status()
        dataset_id = int(response.json()["id"])
        volumes = []
        for i in range(copies):
            files = {"image": (image.name, image.read_bytes(), "application/gzip")}
            data = {"case_id": f"{name}-{i:03d}"}
            if reference:
                seg = CT_DIR / "example_seg.nii.gz"
                files["reference"] = (seg.name, seg.read_bytes(), "application/gzip")
                data |= {"reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "background"}
            response = http.post(f"/api/v1/datasets/{dataset_id}/volumes", files=files, data=data)
            response.raise_for_status()
            volumes.append(int(response.json()["id"]))
    return dataset_id, volumes


def start_segmentation(base: str, researcher: str, volume_id: int) -> int:
    """Simulate a 3-annotator crowd on the volume, then ask for a LiteMedSAM segmentation; its id."""
    headers = {"Authorization": f"Bearer {researcher}"}
    with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
        http.post(f"/api/v1/volumes/{volume_id}/prompts/simulate", json={"annotators": 3}).raise_for_status()
        response = http.post(f"/api/v1/volumes/{volume_id}/segmentations", json={"model": "litemedsam"})
        response.raise_for_status()
        return int(response.json()["id"])


def segmentation_state(base: str, researcher: str, segmentation_id: int) -> dict[str, Any]:
    response = httpx.get(f"{base}/api/v1/segmentations/{segmentation_id}", timeout=30,
                         headers={"Authorization": f"Bearer {researcher}"})
    response.raise_for_status()
    return dict(response.json())


def volumes_needed(cfg: LoadConfig, n_tokens: int, slices_per_volume: int, per_slice: int = 3) -> int:
    """Copies of the volume so the crowd does not run out of slices (3 annotators per slice)."""
    cycle_s = cfg.think_s * (2 + cfg.max_boxes)
    tasks = cfg.clients * (cfg.actions if cfg.actions is not None else max(1.0, cfg.duration_s / cycle_s))
    return max(1, math.ceil(1.5 * tasks / per_slice / slices_per_volume))


# --- standalone ----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500, help="concurrent annotators")
    parser.add_argument("--tokens", type=int, default=50, help="annotator tokens (clients share them round-robin)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (unless --actions)")
    parser.add_argument("--actions", type=int, default=None, help="tasks per client instead of a duration")
    parser.add_argument("--think", type=float, default=3.0, help="mean seconds per look or box drawn")
    parser.add_argument("--cut-every", type=int, default=7, help="cut off every n-th request of a client")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--no-worker", action="store_true", help="no SAM worker beside the API")
    parser.add_argument("--worker-volumes", type=int, default=None,
                        help="volumes (example_ct_sm with its reference) the SAM worker segments (default: enough)")
    parser.add_argument("--volumes", type=int, default=None, help="annotation volumes (default: enough)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-log", type=Path, default=None, help="write the API's log here")
    parser.add_argument("--smoke", action="store_true", help="tiny run in seconds: 20 clients, 2 tasks, no worker")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (database, Redis db, servers) when killed
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.tokens, args.actions, args.think, args.no_worker = 20, 5, 2, 0.05, True
    cfg = LoadConfig(clients=args.clients, actions=args.actions, duration_s=args.duration, think_s=args.think,
                     cut_every=args.cut_every, seed=args.seed)

    from tests import services

    embedded = ROOT / "var" / "test-services"
    server = services.postgres_server_url(embedded)
    url = services.create_database(server)
    redis_base = services.redis_server_url(embedded)
    redis_url, redis_claim = services.claim_redis_db(redis_base)
    data_dir = Path(tempfile.mkdtemp(prefix="crowdsam-crowd-"))
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "CROWDSAM_DATA_DIR": str(data_dir)}
    env.pop("CROWDSAM_STORAGE_URL", None)
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "CROWDSAM_DATA_DIR")})
    worker: subprocess.Popen[bytes] | None = None
    try:
        from app import migrate
        from app.core.db import get_engine

        migrate.upgrade(url)
        researcher, annotators = make_tokens(args.tokens)
        get_engine().dispose()
        with serve(env, workers=args.api_workers, log=args.keep_log) as api:
            base = api.base
            image = CT_DIR / "example_ct.nii.gz"
            n_volumes = args.volumes or volumes_needed(cfg, args.tokens, 112)
            dataset_id, _ = create_dataset(base, researcher, "crowd", image, n_volumes,
                                           annotators=[name for name, _ in annotators])
            segmentations: list[int] = []
            beside = "nothing beside it"
            if not args.no_worker:
                n_sam = args.worker_volumes or max(2, math.ceil(cfg.duration_s / 20))
                for i in range(n_sam):  # other windows: the worker cannot reuse embeddings
                    _, (volume,) = create_dataset(base, researcher, f"sam-{i}", CT_DIR / "example_ct_sm.nii.gz", 1,
                                                  window=(40.0 + 10 * i, 400.0 - 20 * i), reference=True)
                    segmentations.append(start_segmentation(base, researcher, volume))
                worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + 180
                while segmentation_state(base, researcher, segmentations[0])["status"] == "queued":
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the SAM worker did not start segmenting")
                    time.sleep(0.5)
            print(f"crowd: {args.clients} clients on {args.tokens} annotator tokens, think {args.think:g}s, "
                  f"{f'{args.actions} tasks each' if args.actions else f'{args.duration:g}s'}, "
                  f"{n_volumes} volume(s) of example_ct, API workers {args.api_workers}", flush=True)
            cpu_before, load_before = api.cpu_s(), os.getloadavg()[0]
            stats, ledger = asyncio.run(run_load(base, annotators, dataset_id, cfg))
            api_cpu = api.cpu_s() - cpu_before
            machine = (f"API CPU {api_cpu:.1f}s ({1e3 * api_cpu / max(stats.requests, 1):.1f} ms/request); "
                       f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
            if segmentations:
                states = [segmentation_state(base, researcher, s) for s in segmentations]
                done = sum(s["progress"]["done"] for s in states)
                beside = (f"a SAM worker (LiteMedSAM, CPU) segmenting {len(states)} volume(s): "
                          f"{done} slices done, states {[s['status'] for s in states]}")
        lost, duplicated = verify(services._libpq(url), ledger, [name for name, _ in annotators])
        print(f"beside the API: {beside}")
        print(machine)
        for line in report(stats, ledger, lost, duplicated, args.clients):
            print(line, flush=True)
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        with contextlib.suppress(Exception):
            from app.core.db import get_engine
            from app.core.redis import get_redis

            get_engine().dispose()
            get_redis().flushdb()
        services.drop_database(server, url)
        services.release_redis_db(redis_base, redis_claim)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
