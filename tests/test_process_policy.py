"""Process start-up policy: no fork of a threaded process, no idle thread spinning (app.core.runtime).

The worker test runs a real ``crowdsam worker`` process: it segments a volume with LiteMedSAM
(so torch's OpenMP threads exist), then must idle at ~0 % CPU, and its RQ scheduler must be a
fresh interpreter (``workers.scheduler``), not a fork of the worker.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.core.storage import get_storage
from tests.conftest import CT_DIR, ROOT, TOTALSEG_MAP, upload
from tests.segmentation_helpers import ORGANS, canonical_reference, post_boxes, reference_boxes

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _python(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env or CLEAN_ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_test_session_spawns_child_processes_and_bounds_openmp_spinning() -> None:
    assert multiprocessing.get_start_method() == "spawn"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and int(os.environ["GOMP_SPINCOUNT"]) <= 1_000_000


def test_every_cli_command_sets_spawn_before_it_runs() -> None:
    code = ("import multiprocessing; from app.cli import app; app(['db', 'upgrade'], standalone_mode=False); "
            "print(multiprocessing.get_start_method(allow_none=True))")
    assert _python(code).splitlines()[-1] == "spawn"


def test_the_api_process_loads_no_worker_module_and_sets_no_thread_policy() -> None:
    # Importing the API (and the CLI that serves it) changes no environment variable at all.
    # The static side of this rule is tests/test_architecture.py (import-linter contracts).
    code = ("import os, sys; before = dict(os.environ); import app.main, app.segmentations.router, app.cli; "
            "print(dict(os.environ) == before, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
            "sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'workers'))")
    assert _python(code) == "True None None []"


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "ACTIVE 100000"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),  # an operator's choice wins; no spin added to PASSIVE
    ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5000"}, "ACTIVE 5000"),
])
def test_model_processes_get_a_bounded_active_policy_unless_the_operator_chose(env: dict[str, str],
                                                                               expected: str) -> None:
    code = ("import os; from app.core.runtime import configure_process; configure_process(runs_models=True); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    assert _python(code, {**CLEAN_ENV, **env}) == expected


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.model
def test_a_worker_that_ran_the_model_idles_at_zero_cpu_and_never_forks(client, tokens, dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    volume = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                    case_id="idle", reference_map=json.dumps(TOTALSEG_MAP), reference_other="background").json()
    ref = canonical_reference(CT_DIR / "example_seg.nii.gz")
    post_boxes(client, tokens.headers("annotator"), volume["id"],
               reference_boxes(ref, {"liver": ORGANS["liver"]}, [10, 12]))
    sid = client.post(f"/api/v1/volumes/{volume['id']}/segmentations", json={},
                      headers=tokens.headers("researcher")).json()["id"]
    env = {**CLEAN_ENV, "CROWDSAM_DATA_DIR": str(tmp_path / "worker-data"),
           "CROWDSAM_STORAGE_URL": get_storage().root, "CROWDSAM_TORCH_THREADS": "2"}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "-q", "sam"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while client.get(f"/api/v1/segmentations/{sid}", headers=tokens.headers("researcher")).json()["status"] \
                != "finished":
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # the job's last parallel region is over; threads now wait
        before = _cpu_seconds(worker.pid)
        time.sleep(4.0)
        idle = _cpu_seconds(worker.pid) - before
        # A spinning OpenMP pool burns ~1 core (4 s here); an idle worker only polls Redis.
        assert idle < 0.5, f"idle worker used {idle:.2f} s of CPU in 4 s"

        children = _children(worker.pid)
        commands = [Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0") for c in children]
        assert [c[1:3] for c in commands] == [[b"-m", b"workers.scheduler"]], commands
        scheduler_env = dict(item.split(b"=", 1) for item in Path(f"/proc/{children[0]}/environ").read_bytes()
                             .split(b"\0") if b"=" in item)
        assert scheduler_env[b"GOMP_SPINCOUNT"] == b"100000"
        # Batch work yields the CPU to the API on a shared host (CROWDSAM_WORKER_NICE, default 10).
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, base + 10)
        assert os.getpriority(os.PRIO_PROCESS, children[0]) == min(19, base + 10)
    finally:
        worker.terminate()  # warm shutdown: the worker stops its scheduler
        worker.wait(timeout=60)
        log.close()
    deadline = time.monotonic() + 20
    while any(_alive(c) for c in children):
        assert time.monotonic() < deadline, "the scheduler outlived its worker"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
