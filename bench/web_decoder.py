"""SAM's prompt decoder in the browser (``app/static/js/sam.js``): what the annotate page's live mask costs.

Playwright drives the real annotate page in headless Chromium (``/usr/bin/chromium``) against the real app
(uvicorn in a thread) with a scratch database, Redis db and data dir (as ``bench/ingest.py``); the slice
embedding is published by a real in-process RQ worker (``sam`` queue). Per model of ``GET /models`` that can
run here, it prints one line per number:

- embedding: bytes on the wire (gzip float16) and fetch time (page ``fetch`` + inflate, warm server, median of
  ``--fetches``), and the first, cold fetch including the worker's encoder pass;
- decoder: ONNX bytes and load time (download + onnxruntime-web session, WebAssembly already compiled);
- pointer-up → overlay painted: ``--boxes`` boxes drawn with the mouse (8 pointer moves each); the time from
  the page's ``pointerup`` to the paint of the mask of the final box (0 when it was already painted), median
  and p90; and the decoder run alone (``session.run`` + post-processing) per box;
- dragging: a box moved about for ``--drag-seconds`` — canvas frames per second and mask updates per second.

Each model runs once per ``--configs`` entry THREADSxLANES: WebAssembly threads per decoder worker (the page's
``?sam_threads=``; the page is cross-origin isolated, so it may use threads) and decoder workers (``?sam_lanes=``).
Timings are printed, never asserted; the last line is a summary. ::

    .venv/bin/python bench/web_decoder.py [--boxes 20] [--drag-seconds 2] [--fetches 5] [--models litemedsam]
                                          [--configs 1x1 2x1 1x2]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests import services  # noqa: E402

CT = ROOT / "data" / "samples" / "totalsegmentator" / "example_ct_sm.nii.gz"
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}

# True once the selected box's mask is decoded for its current prompt (nothing newer queued or running).
PREVIEW_CURRENT = """() => {
  const a = window.crowdsamAnnotate;
  const id = a.state.selected;
  const r = id && a.state.sam.results.get(id);
  return Boolean(r) && r.key === a.samKeyOf(id) && !a.state.sam.live.busy && a.state.sam.live.pending.size === 0;
}"""

INSTRUMENT = """() => {
  window.__painted = [];
  window.__up = 0;
  window.__frames = 0;
  document.querySelector('#canvas').addEventListener('sam-painted', (e) => window.__painted.push(e.detail));
  window.addEventListener('pointerup', () => { window.__up = performance.now(); }, true);
  const view = window.crowdsamAnnotate.view;
  const draw = view.draw.bind(view);
  view.draw = () => { window.__frames += 1; draw(); };
}"""

# After a box is drawn: pointer-up → the paint of the final box's mask (0 if painted before pointer-up).
LATENCY = """() => {
  const a = window.crowdsamAnnotate;
  const key = a.samKeyOf(a.state.selected);
  const hits = window.__painted.filter((p) => p.key === key);
  const last = hits[hits.length - 1];
  return {latency: last ? Math.max(0, last.paintedAt - window.__up) : null, decode: last ? last.decodeMs : null};
}"""

FETCH = """async ([url, token]) => {
  const t0 = performance.now();
  const r = await fetch(url, {headers: {Authorization: `Bearer ${token}`}, cache: 'no-store'});
  const body = await r.arrayBuffer();
  return {ms: performance.now() - t0, status: r.status, inflated: body.byteLength};
}"""


def wait_js(page: Any, expression: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {expression}")
        page.wait_for_timeout(10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def bench_model(browser: Any, base: str, model: str, threads: int, lanes: int, token: str, dataset_id: int,
                args: argparse.Namespace, run_jobs: Any) -> dict[str, float]:
    from tests.browser.harness import LAPTOP

    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto(f"{base}/annotate?dataset={dataset_id}&sam={model}&sam_threads={threads}&sam_lanes={lanes}"
              f"#token={token}")
    page.wait_for_selector("#canvas[data-ready='true']", timeout=30_000)
    deadline = time.monotonic() + 300
    while page.locator("#canvas[data-sam='ready'], #canvas[data-sam='failed']").count() == 0:
        run_jobs()  # the page's embedding request queued a publishing job
        if time.monotonic() > deadline:
            raise SystemExit(f"{model}: no preview after 300 s")
        page.wait_for_timeout(100)
    if page.locator("#canvas[data-sam='failed']").count():
        raise SystemExit(f"{model}: {page.locator('#sam-status').inner_text()}")
    timings = page.evaluate("window.crowdsamAnnotate.state.sam.timings")
    volume, k = page.evaluate("[crowdsamAnnotate.state.task.volume_id, crowdsamAnnotate.state.task.slice]")
    url = f"/api/v1/volumes/{volume}/slices/{k}/embedding?model={model}"
    fetches = [page.evaluate(FETCH, [url, token]) for _ in range(args.fetches)]
    assert all(f["status"] == 200 for f in fetches), fetches
    out = {
        "embedding_bytes": float(timings["wireBytes"]),
        "embedding_fetch_ms": statistics.median(f["ms"] for f in fetches),
        "embedding_first_ms": float(timings["embeddingMs"]),
        "embedding_pending_ms": float(timings["pendingMs"]),
        "decoder_bytes": float(timings["decoderBytes"]),
        "decoder_load_ms": float(timings["decoderLoadMs"]),
        "threads": float(timings["threads"]),
        "isolated": float(bool(page.evaluate("window.crossOriginIsolated"))),
    }

    page.evaluate(INSTRUMENT)
    canvas = page.locator("#canvas").bounding_box()
    w, h = page.evaluate("[window.crowdsamAnnotate.view.w, window.crowdsamAnnotate.view.h]")
    scale = min(canvas["width"] / w, canvas["height"] / h)
    ox = canvas["x"] + (canvas["width"] - w * scale) / 2
    oy = canvas["y"] + (canvas["height"] - h * scale) / 2

    def screen(x: float, y: float) -> tuple[float, float]:
        return ox + x * scale, oy + y * scale

    rng = random.Random(0)
    latencies: list[float] = []
    decodes: list[float] = []
    for _ in range(args.boxes):
        bw, bh = rng.uniform(0.12, 0.4) * w, rng.uniform(0.12, 0.4) * h
        x0, y0 = rng.uniform(0.1 * w, 0.9 * w - bw), rng.uniform(0.1 * h, 0.9 * h - bh)
        page.mouse.move(*screen(x0, y0))
        page.mouse.down()
        page.mouse.move(*screen(x0 + bw, y0 + bh), steps=8)
        page.mouse.up()
        wait_js(page, PREVIEW_CURRENT)
        got = page.evaluate(LATENCY)
        if got["latency"] is not None:
            latencies.append(float(got["latency"]))
        if got["decode"] is not None:
            decodes.append(float(got["decode"]))
        page.keyboard.press("Delete")
    out["up_to_paint_median_ms"] = statistics.median(latencies)
    out["up_to_paint_p90_ms"] = pct(latencies, 0.9)
    out["decode_median_ms"] = statistics.median(decodes)
    out["decode_p90_ms"] = pct(decodes, 0.9)
    out["boxes"] = float(len(latencies))

    # Dragging: one box moved in a circle for --drag-seconds.
    cx, cy, half = w / 2, h / 2, min(w, h) / 6
    page.mouse.move(*screen(cx - half, cy - half))
    page.mouse.down()
    page.mouse.move(*screen(cx + half, cy + half), steps=4)
    page.mouse.up()
    wait_js(page, PREVIEW_CURRENT)
    page.evaluate("() => { window.__painted = []; window.__frames = 0; }")
    page.mouse.move(*screen(cx, cy))
    page.mouse.down()
    started = time.monotonic()
    t0 = page.evaluate("performance.now()")
    while (elapsed := time.monotonic() - started) < args.drag_seconds:
        angle = elapsed * 2 * math.pi / args.drag_seconds
        page.mouse.move(*screen(cx + half * 0.6 * math.cos(angle), cy + half * 0.6 * math.sin(angle)))
        page.wait_for_timeout(8)
    page.mouse.up()
    t1 = page.evaluate("performance.now()")
    frames, updates = page.evaluate("[window.__frames, window.__painted.length]")
    seconds = (t1 - t0) / 1000
    out["drag_fps"] = frames / seconds
    out["drag_mask_updates_per_s"] = updates / seconds
    wait_js(page, PREVIEW_CURRENT)
    if errors:
        raise SystemExit(f"{model}: errors on the page: {errors}")
    context.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=20, help="boxes drawn for pointer-up → paint")
    parser.add_argument("--drag-seconds", type=float, default=2.0)
    parser.add_argument("--fetches", type=int, default=5, help="warm embedding fetches timed")
    parser.add_argument("--models", nargs="*", help="models to bench (default: every available one)")
    parser.add_argument("--configs", nargs="+", default=["1x1", "2x1", "1x2"],
                        help="THREADSxLANES to compare: WASM threads per decoder worker (?sam_threads=) x decoder "
                             "workers (?sam_lanes=: 2 lets a let-go box start while an older state decodes)")
    args = parser.parse_args()

    embedded = ROOT / "var" / "test-services"
    server = services.postgres_server_url(embedded)
    url = services.create_database(server)
    redis_base = services.redis_server_url(embedded)
    redis_url, redis_claim = services.claim_redis_db(redis_base)
    data_dir = Path(tempfile.mkdtemp(prefix="crowdsam-bench-"))
    os.environ.update({"DATABASE_URL": url, "REDIS_URL": redis_url, "CROWDSAM_DATA_DIR": str(data_dir)})
    try:
        from rq import SimpleWorker

        from app import migrate
        from app.auth.models import Role
        from app.auth.service import create_token
        from app.core.db import session_scope
        from app.core.redis import get_queue, get_redis
        from tests.browser.harness import chromium, live_server

        migrate.upgrade(url)
        with session_scope() as session:
            researcher = create_token(session, "bench-researcher", Role.researcher)[1]
            annotator = create_token(session, "bench-annotator", Role.annotator)[1]
            session.commit()

        def run_jobs() -> bool:
            return bool(SimpleWorker([get_queue("sam")], connection=get_redis()).work(burst=True))

        with live_server() as base, chromium() as browser:
            staff = {"Authorization": f"Bearer {researcher}"}
            models = httpx.get(f"{base}/api/v1/models", headers=staff, timeout=30).json()
            ds = httpx.post(f"{base}/api/v1/datasets", headers=staff, timeout=30, json={
                "name": "bench", "labels": LABELS, "window": {"level": 40, "width": 400},
                "annotators": ["bench-annotator"]}).json()
            vol = httpx.post(f"{base}/api/v1/datasets/{ds['id']}/volumes", headers=staff, timeout=120,
                             files={"image": (CT.name, CT.read_bytes(), "application/gzip")}, data={"case_id": "bench"})
            assert vol.status_code == 201, vol.text
            load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
            print(f"web_decoder: headless Chromium, {os.cpu_count()}-core CPU (load average {load}), "
                  f"onnxruntime-web WASM in a module worker; slice 122×101 of example_ct_sm")
            results: dict[str, dict[str, float]] = {}
            for info in models:
                model = info["name"]
                if args.models and model not in args.models:
                    continue
                if not info["available"]:
                    print(f"{model}: skipped ({info.get('reason') or 'not available here'})")
                    continue
                for config in args.configs:
                    threads, lanes = (int(v) for v in config.split("x"))
                    name = f"{model}/{threads}thread{'s' if threads > 1 else ''}x{lanes}lane{'s' if lanes > 1 else ''}"
                    r = results[name] = bench_model(browser, base, model, threads, lanes, annotator, ds["id"], args,
                                                    run_jobs)
                    print(f"{name} embedding bytes on the wire (gzip fp16): {r['embedding_bytes']:.0f}")
                    print(f"{name} embedding fetch ms (warm, median of {args.fetches}): {r['embedding_fetch_ms']:.1f}")
                    print(f"{name} embedding first fetch ms (202 polling while a worker encodes): "
                          f"{r['embedding_first_ms']:.0f} (waiting {r['embedding_pending_ms']:.0f})")
                    print(f"{name} decoder bytes: {r['decoder_bytes']:.0f}")
                    print(f"{name} decoder load ms (download + session): {r['decoder_load_ms']:.0f} "
                          f"({r['threads']:.0f} WASM thread(s), crossOriginIsolated {bool(r['isolated'])})")
                    print(f"{name} pointer-up -> overlay painted ms over {r['boxes']:.0f} boxes: median "
                          f"{r['up_to_paint_median_ms']:.1f}, p90 {r['up_to_paint_p90_ms']:.1f}")
                    print(f"{name} decoder run + postprocess ms per box: median {r['decode_median_ms']:.1f}, "
                          f"p90 {r['decode_p90_ms']:.1f}")
                    print(f"{name} dragging ({args.drag_seconds:g} s): canvas frames/s {r['drag_fps']:.1f}, "
                          f"mask updates/s {r['drag_mask_updates_per_s']:.1f}")
            summary = " ".join(
                f"{name}:bytes={r['embedding_bytes']:.0f},fetch_ms={r['embedding_fetch_ms']:.0f},"
                f"decoder_load_ms={r['decoder_load_ms']:.0f},up_to_paint_p50_ms={r['up_to_paint_median_ms']:.0f},"
                f"p90_ms={r['up_to_paint_p90_ms']:.0f},fps={r['drag_fps']:.0f},mask_per_s={r['drag_mask_updates_per_s']:.1f}"
                for name, r in results.items())
            print(f"web_decoder runs={len(results)} {summary}")
    finally:
        with contextlib.suppress(Exception):
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
