"""Task assignment cost: ``app.tasks.service.next_task`` on one large dataset, early and late in a crowd round.

A dataset of ``--volumes`` × ``--slices`` slices (volume rows only: assignment reads no voxels). Each
phase times ``--calls`` calls by fresh annotators, each marking its task seen before the next call:

- early: nothing seen yet (the fast path: the first free slices);
- late: every slice already seen by 3 annotators (10 % by 2), boxes on 40 % of the slices, drawn by 2
  or 3 of them with some jitter, so the full ranking runs with agreement (the first call recomputes
  the whole dataset's agreement; later calls only what changed).

Standalone like ``bench/crowd_load.py``: a scratch database (``TEST_DATABASE_URL``, a local server
on :5432, or the embedded test cluster) and a Redis db of its own; the last line is always
``task_assignment slices=N early_ms=E late_ms=L late_first_ms=F``.

    .venv/bin/python bench/task_assignment.py [--volumes 100] [--slices 300] [--calls 40] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

_VIEWS = text(
    "INSERT INTO slice_views (volume_id, slice_index, annotator, source) "
    "SELECT v, k, a, 'api' FROM unnest(CAST(:v AS integer[]), CAST(:k AS integer[]), CAST(:a AS text[])) AS t(v, k, a)"
)
_BOXES = text(
    "INSERT INTO prompts (volume_id, slice_index, label, annotator, kind, x0, y0, x1, y1, source, client_id) "
    "SELECT v, k, 'liver', a, 'box', x0, y0, x0 + 40, y0 + 40, 'api', gen_random_uuid() FROM unnest("
    "CAST(:v AS integer[]), CAST(:k AS integer[]), CAST(:a AS text[]), CAST(:x0 AS float8[]), "
    "CAST(:y0 AS float8[])) AS t(v, k, a, x0, y0)"
)


def make_dataset(session: Session, volumes: int, slices: int) -> tuple[int, list[int]]:
    from app.datasets.models import Dataset
    from app.volumes.models import Volume

    dataset = Dataset(name="bench", labels={"liver": 5, "spleen": 1}, window_level=40.0, window_width=400.0)
    session.add(dataset)
    session.flush()
    rows = [Volume(dataset_id=dataset.id, case_id=f"case{i:04d}", split="train", image_key="-", canonical_key="-",
                   shape=[122, 101, slices], canonical_shape=[122, 101, slices], spacing=[3.0, 3.0, 3.0],
                   affine=[[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]], orientation="RAS",
                   dtype="int16", sha256="0" * 64, size_bytes=0) for i in range(volumes)]
    session.add_all(rows)
    session.flush()
    return dataset.id, [v.id for v in rows]


def seed_late_round(session: Session, volume_ids: list[int], slices: int, seed: int) -> tuple[int, int]:
    """Every slice seen by 3 annotators (10 % by 2); boxes on 40 % of them; (views, boxes)."""
    rng = random.Random(seed)
    views: list[tuple[int, int, str]] = []
    boxes: list[tuple[int, int, str, float, float]] = []
    for v in volume_ids:
        for k in range(slices):
            for a in range(2 if rng.random() < 0.1 else 3):
                views.append((v, k, f"crowd{a}"))
            if rng.random() < 0.4:
                for a in range(2 if rng.random() < 0.5 else 3):
                    boxes.append((v, k, f"crowd{a}", 20 + rng.gauss(0, 6), 20 + rng.gauss(0, 6)))
    session.execute(_VIEWS, {"v": [r[0] for r in views], "k": [r[1] for r in views], "a": [r[2] for r in views]})
    session.execute(_BOXES, {"v": [b[0] for b in boxes], "k": [b[1] for b in boxes], "a": [b[2] for b in boxes],
                             "x0": [b[3] for b in boxes], "y0": [b[4] for b in boxes]})
    session.execute(text("ANALYZE slice_views"))
    session.execute(text("ANALYZE prompts"))
    return len(views), len(boxes)


def time_calls(dataset_id: int, calls: int, phase: str) -> list[float]:
    """Seconds per ``next_task`` call; each caller is a new annotator who then answers "nothing here"."""
    from app.auth.models import Role
    from app.auth.security import Principal
    from app.core.db import session_scope
    from app.prompts.service import record_views
    from app.tasks import service
    from app.volumes.models import Volume

    out = []
    for i in range(calls):
        with session_scope() as session:
            who = Principal(token_id=1, name=f"{phase}-{i}", role=Role.annotator)
            started = time.perf_counter()
            task = service.next_task(session, dataset_id, who)
            out.append(time.perf_counter() - started)
            if task is not None:  # as POST /prompts {"seen": [k]} does (marks the slice for agreement too)
                volume = session.get(Volume, task.volume_id)
                assert volume is not None
                record_views(session, volume, [(task.slice, who.name)], "api")
            session.commit()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--slices", type=int, default=300, help="slices per volume")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run: 3 volumes of 20 slices, 5 calls")
    args = parser.parse_args()
    if args.smoke:
        args.volumes, args.slices, args.calls = 3, 20, 5

    from tests import services

    embedded = ROOT / "var" / "test-services"
    server = services.postgres_server_url(embedded)
    url = services.create_database(server)
    redis_base = services.redis_server_url(embedded)
    redis_url, redis_claim = services.claim_redis_db(redis_base)
    os.environ.update({"DATABASE_URL": url, "REDIS_URL": redis_url,
                       "CROWDSAM_DATA_DIR": tempfile.mkdtemp(prefix="crowdsam-tasks-")})
    try:
        from app import migrate
        from app.core.db import get_engine, session_scope

        migrate.upgrade(url)
        with session_scope() as session:
            dataset_id, volume_ids = make_dataset(session, args.volumes, args.slices)
            session.commit()
        n = args.volumes * args.slices
        early = time_calls(dataset_id, args.calls, "early")
        with session_scope() as session:
            views, boxes = seed_late_round(session, volume_ids, args.slices, args.seed)
            session.commit()
        late = time_calls(dataset_id, args.calls, "late")
        print(f"{args.volumes} volumes x {args.slices} slices = {n} slices; late round: {views} views, {boxes} boxes")
        for name, times in (("early (fast path)", early), ("late (first call)", late[:1]),
                            ("late (later calls)", late[1:] or late)):
            print(f"{name:>20}: mean {1e3 * statistics.mean(times):8.1f} ms  p50 {1e3 * statistics.median(times):8.1f}"
                  f"  max {1e3 * max(times):8.1f}")
        print(f"task_assignment slices={n} early_ms={1e3 * statistics.mean(early):.1f} "
              f"late_ms={1e3 * statistics.mean(late[1:] or late):.1f} late_first_ms={1e3 * late[0]:.1f}", flush=True)
        get_engine().dispose()
    finally:
        services.drop_database(server, url)
        services.release_redis_db(redis_base, redis_claim)


if __name__ == "__main__":
    main()
