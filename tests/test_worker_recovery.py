"""A worker killed with SIGKILL mid-job leaves no mask; the restarted worker retries the job,
which finishes with exactly the mask a clean run produces (same sha256)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rq.job import Job
from rq.registry import StartedJobRegistry

from app.core.db import session_scope
from app.core.redis import get_redis
from app.core.storage import get_storage
from app.segmentations.models import Segmentation
from tests.conftest import CT_DIR, ROOT, TOTALSEG_MAP, upload
from tests.segmentation_helpers import ORGANS, canonical_reference, post_boxes, reference_boxes, reoriented_copy

pytestmark = pytest.mark.model

SLICES = [2, 7, 12, 17, 22]  # 5 prompted slices: >= 1 s of encoder each on 2 CPU cores


class WorkerProcess:
    """``crowdsam worker -q sam`` as a real subprocess in its own process group (a 'container')."""

    def __init__(self, log: Path, data_dir: Path) -> None:
        env = {
            **os.environ,
            "CROWDSAM_DATA_DIR": str(data_dir),  # its own embedding caches: a cold, independent run
            "CROWDSAM_STORAGE_URL": get_storage().root,  # the shared artefact store
            "CROWDSAM_TORCH_THREADS": "2",
        }
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "-q", "sam"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill9(self) -> None:
        """SIGKILL the worker and everything it started (its scheduler process), like a crashed pod."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def _row(sid: int) -> Segmentation:
    with session_scope() as session:
        row = session.get(Segmentation, sid)
        assert row is not None
        session.expunge(row)
        return row


def _wait(sid: int, ready, timeout: float, log: Path) -> Segmentation:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _row(sid)
        if ready(row):
            return row
        time.sleep(0.05)
    raise AssertionError(f"timed out; last row {vars(_row(sid))}; worker log:\n{log.read_text()[-4000:]}")


def test_sigkill_mid_job_leaves_no_mask_and_the_retry_finishes_with_the_clean_mask(  # type: ignore[no-untyped-def]
    client, tokens, dataset, run_jobs, tmp_path
) -> None:
    image, ref = reoriented_copy(tmp_path, CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                                 ("R", "A", "S"), tag=uuid.uuid4().hex[:8])
    volume = upload(client, tokens, dataset["id"], image, ref, case_id="killed",
                    reference_map=json.dumps(TOTALSEG_MAP), reference_other="background").json()
    vid = volume["id"]
    boxes = reference_boxes(canonical_reference(ref), {n: ORGANS[n] for n in ("liver", "spleen", "aorta")}, SLICES)
    post_boxes(client, tokens.headers("annotator"), vid, boxes)
    headers = tokens.headers("researcher")
    sid = client.post(f"/api/v1/volumes/{vid}/segmentations", json={}, headers=headers).json()["id"]
    prefix = Path(get_storage().root) / f"volumes/{vid}/segmentations/{sid}"
    log = tmp_path / "worker.log"

    first = WorkerProcess(log, tmp_path / "worker-data")
    try:
        running = _wait(sid, lambda r: r.status == "running" and r.progress.get("done", 0) >= 1, 240, log)
        first.kill9()
    finally:
        if first.proc.poll() is None:
            first.kill9()
    assert running.progress["done"] < len(SLICES), "the job finished before it could be killed"

    # Nothing of the interrupted run is visible: no mask key, no file (not even a temp file).
    dead = _row(sid)
    assert dead.status == "running" and dead.mask_key is None and dead.mask_sha256 is None
    assert client.get(f"/api/v1/segmentations/{sid}/mask", headers=headers).status_code == 409
    assert not prefix.exists() or list(prefix.rglob("*")) == []
    assert f"segmentation-{sid}" in StartedJobRegistry("sam", connection=get_redis()).get_job_ids(cleanup=False)

    # A restarted worker hands the abandoned job back to RQ's retry (5 s backoff) and runs it.
    second = WorkerProcess(log, tmp_path / "worker-data")
    try:
        handed_back = _wait(sid, lambda r: r.status != "running" or r.attempts >= 2, 120, log)
        assert handed_back.attempts >= 2 or "handed back for a retry" in (handed_back.error or "")
        finished = _wait(sid, lambda r: r.status in ("finished", "failed"), 300, log)
    finally:
        second.stop()
    assert finished.status == "finished", finished.error
    assert finished.attempts == 2 and finished.error is None
    job = Job.fetch(f"segmentation-{sid}", connection=get_redis())
    assert job.retries_left == 2
    files = sorted(p.name for p in prefix.rglob("*"))
    assert files == ["mask.nii.gz"]

    # A clean run of the same prompts, in this process with other caches, gives the same bytes.
    clean = client.post(f"/api/v1/volumes/{vid}/segmentations", json={}, headers=headers).json()["id"]
    run_jobs("sam")
    clean_row = _row(clean)
    assert clean_row.status == "finished"
    assert clean_row.mask_sha256 == finished.mask_sha256
    recovered = client.get(f"/api/v1/segmentations/{sid}/mask", headers=headers).content
    assert recovered == client.get(f"/api/v1/segmentations/{clean}/mask", headers=headers).content


@pytest.mark.parametrize("state", ["alive", "gone", "zombie"])
def test_only_a_dead_schedulers_lock_is_released(state: str) -> None:
    """A crashed scheduler's lock is freed at worker start (also when the killed process is an
    unreaped zombie, as after SIGKILL of a whole worker process group); a live one's is kept."""
    import socket

    from app.core.redis import get_queue
    from workers.run import release_dead_scheduler_locks

    child = None
    if state == "alive":
        pid = os.getpid()
    else:
        child = subprocess.Popen(["true"])
        pid = child.pid
        if state == "gone":
            child.wait()
        else:  # exited but not yet reaped
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
                assert time.monotonic() < deadline
                time.sleep(0.01)
    try:
        redis = get_redis()
        redis.set("rq:scheduler-lock:sam", "sched-1", ex=60)
        redis.hset("rq:scheduler:sched-1", mapping={"name": "sched-1", "hostname": socket.gethostname(), "pid": pid})
        released = release_dead_scheduler_locks([get_queue("sam")])
        assert released == ([] if state == "alive" else ["sam"])
        assert (redis.get("rq:scheduler-lock:sam") is not None) is (state == "alive")
    finally:
        if child is not None:
            child.wait()
