"""Prompt ingest throughput: boxes/s through the API (bulk and single-box requests) vs raw psycopg.

Standalone: creates a scratch database on the configured PostgreSQL (``TEST_DATABASE_URL``, a
local server on :5432, or the embedded test cluster under ``var/test-services``), migrates it,
starts the real app with uvicorn in a subprocess, and posts boxes over HTTP. The raw baseline
inserts the same rows into the same table with psycopg ``executemany`` and with ``COPY``.
The API also records seen slices and releases task leases per request; the raw insert does not.

    .venv/bin/python bench/ingest.py [--boxes 20000] [--batch 1000] [--single 1000] [--clients 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests import services  # noqa: E402

SLICES, WIDTH, HEIGHT = 30, 122, 101
LABELS = ["spleen", "kidney_right", "kidney_left", "liver", "aorta"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def random_boxes(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, WIDTH - 21), rng.uniform(0, HEIGHT - 21)
        out.append({"slice": rng.randrange(SLICES), "label": rng.choice(LABELS),
                    "box": [x0, y0, x0 + rng.uniform(1, 20), y0 + rng.uniform(1, 20)],
                    "client_id": str(uuid.uuid4())})
    return out


def post_all(url: str, headers: dict[str, str], bodies: list[dict], clients: int) -> float:
    """POST every body (spread over ``clients`` threads); returns elapsed seconds."""
    chunks = [bodies[i::clients] for i in range(clients)]
    errors: list[str] = []

    def run(chunk: list[dict]) -> None:
        with httpx.Client(timeout=120) as http:
            for body in chunk:
                r = http.post(url, json=body, headers=headers)
                if r.status_code != 201:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks if c]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"API errors: {errors[:5]}")
    return elapsed


def raw_rows(boxes: list[dict], volume_id: int, annotator: str) -> list[tuple]:
    return [(volume_id, b["slice"], b["label"], annotator, None, "box", *b["box"], None, "api", uuid.uuid4())
            for b in boxes]


COLUMNS = "volume_id, slice_index, label, annotator, token_id, kind, x0, y0, x1, y1, positive, source, client_id"


def raw_executemany(dsn: str, rows: list[tuple]) -> float:
    with psycopg.connect(dsn) as conn:
        start = time.perf_counter()
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO prompts ({COLUMNS}) VALUES ({', '.join(['%s'] * 13)})", rows)
        conn.commit()
        return time.perf_counter() - start


def raw_single_transactions(dsn: str, rows: list[tuple]) -> float:
    """One INSERT and one COMMIT per row: the fair baseline for single-box requests."""
    with psycopg.connect(dsn) as conn:
        start = time.perf_counter()
        for row in rows:
            conn.execute(f"INSERT INTO prompts ({COLUMNS}) VALUES ({', '.join(['%s'] * 13)})", row)
            conn.commit()
        return time.perf_counter() - start


def raw_copy(dsn: str, rows: list[tuple]) -> float:
    with psycopg.connect(dsn) as conn:
        start = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY prompts ({COLUMNS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=20_000, help="boxes for the bulk API and raw runs")
    parser.add_argument("--batch", type=int, default=1_000, help="boxes per bulk request")
    parser.add_argument("--single", type=int, default=1_000, help="boxes posted one per request")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients for single-box posts")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()

    embedded = ROOT / "var" / "test-services"
    server = services.postgres_server_url(embedded)
    url = services.create_database(server)
    dsn = services._libpq(url)
    redis_base = services.redis_server_url(embedded)
    redis_url, redis_claim = services.claim_redis_db(redis_base)  # a db of its own, never another run's
    data_dir = Path(tempfile.mkdtemp(prefix="crowdsam-bench-"))
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "CROWDSAM_DATA_DIR": str(data_dir)}
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "CROWDSAM_DATA_DIR")})
    proc = None
    try:
        from app import migrate
        from app.auth.models import Role
        from app.auth.service import create_token
        from app.core.db import get_engine, session_scope

        migrate.upgrade(url)
        with session_scope() as session:
            researcher = create_token(session, "bench-researcher", Role.researcher)[1]
            annotators = [create_token(session, f"bench-{i}", Role.annotator)[1] for i in range(args.clients + 1)]
            session.commit()
        get_engine().dispose()

        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", "--workers", str(args.workers)],
            cwd=ROOT, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the API did not start")
            time.sleep(0.2)

        staff = {"Authorization": f"Bearer {researcher}"}
        ds = httpx.post(f"{base}/api/v1/datasets", headers=staff, timeout=30, json={
            "name": "bench", "labels": {name: i + 1 for i, name in enumerate(LABELS)},
            "annotators": [f"bench-{i}" for i in range(args.clients + 1)]}).json()
        image = ROOT / "data" / "samples" / "totalsegmentator" / "example_ct_sm.nii.gz"
        vol = httpx.post(f"{base}/api/v1/datasets/{ds['id']}/volumes", headers=staff, timeout=60,
                         files={"image": (image.name, image.read_bytes(), "application/gzip")},
                         data={"case_id": "bench"}).json()
        prompts_url = f"{base}/api/v1/volumes/{vol['id']}/prompts"
        # warm up (connections, caches)
        post_all(prompts_url, {"Authorization": f"Bearer {annotators[0]}"},
                 [{"boxes": random_boxes(10, 99)}], 1)

        bulk = random_boxes(args.boxes, 1)
        bodies = [{"boxes": bulk[i:i + args.batch]} for i in range(0, len(bulk), args.batch)]
        bulk_s = post_all(prompts_url, {"Authorization": f"Bearer {annotators[0]}"}, bodies, 1)
        retry_s = post_all(prompts_url, {"Authorization": f"Bearer {annotators[0]}"}, bodies, 1)

        single = random_boxes(args.single, 2)
        single_seq_s = post_all(prompts_url, {"Authorization": f"Bearer {annotators[1]}"},
                                [{"boxes": [b]} for b in single[: args.single // 2]], 1)
        per_client = [{"boxes": [b]} for b in single[args.single // 2:]]
        single_par_s = 0.0
        if per_client:
            threads_bodies = [per_client[i::args.clients] for i in range(args.clients)]
            errors: list[str] = []

            def run(i: int) -> None:
                headers = {"Authorization": f"Bearer {annotators[1 + i]}"}
                with httpx.Client(timeout=120) as http:
                    for body in threads_bodies[i]:
                        r = http.post(prompts_url, json=body, headers=headers)
                        if r.status_code != 201:
                            errors.append(r.text[:200])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            single_par_s = time.perf_counter() - start
            if errors:
                raise SystemExit(f"API errors: {errors[:5]}")

        rows_many = raw_rows(bulk, vol["id"], "raw-executemany")
        many_s = raw_executemany(dsn, rows_many)
        rows_copy = raw_rows(bulk, vol["id"], "raw-copy")
        copy_s = raw_copy(dsn, rows_copy)
        rows_single = raw_rows(single[: args.single // 2], vol["id"], "raw-single")
        raw_single_s = raw_single_transactions(dsn, rows_single)

        with psycopg.connect(dsn) as conn:
            stored = conn.execute("SELECT count(*) FROM prompts").fetchone()[0]  # type: ignore[index]
        expected = 10 + args.boxes + args.single + 2 * args.boxes + args.single // 2
        assert stored == expected, (stored, expected)

        n = args.boxes
        rate = lambda count, seconds: count / seconds if seconds else float("nan")  # noqa: E731
        where = make_url(server).host or "embedded (unix socket)"
        print(f"crowdsam prompt ingest — {n} boxes; API on uvicorn ({args.workers} worker); PostgreSQL at {where}")
        print(f"{'path':58s} {'boxes':>7s} {'seconds':>8s} {'boxes/s':>10s}")
        table = [
            (f"API bulk ({args.batch}/request, 1 client)", n, bulk_s),
            (f"API bulk retry, all duplicates ({args.batch}/request)", n, retry_s),
            ("API single-box requests, 1 client", args.single // 2, single_seq_s),
            (f"API single-box requests, {args.clients} concurrent clients", len(per_client), single_par_s),
            ("raw psycopg executemany (one transaction)", n, many_s),
            ("raw psycopg COPY (one transaction)", n, copy_s),
            ("raw psycopg one row per transaction", len(rows_single), raw_single_s),
        ]
        for name, count, seconds in table:
            print(f"{name:58s} {count:7d} {seconds:8.2f} {rate(count, seconds):10.0f}")
        print(f"ratio API bulk / raw executemany: {rate(n, bulk_s) / rate(n, many_s):.2f}")
        print(f"ratio API bulk / raw COPY:        {rate(n, bulk_s) / rate(n, copy_s):.2f}")
        print(f"ratio API single (1 client) / raw one row per transaction: "
              f"{rate(args.single // 2, single_seq_s) / rate(len(rows_single), raw_single_s):.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        with contextlib.suppress(Exception):  # cleanup goes on whatever failed above
            from app.core.db import get_engine

            get_engine().dispose()
        services.drop_database(server, url)
        with contextlib.suppress(Exception):
            import redis

            redis.Redis.from_url(redis_url).flushdb()
        services.release_redis_db(redis_base, redis_claim)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
