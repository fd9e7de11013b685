"""One job lifecycle for every kind: exports and evaluations behave like segmentations.

Real worker processes, real PostgreSQL and Redis. A worker that stops answering (frozen, or its
host lost: SIGSTOP stands in for both, then SIGKILL) is noticed by its heartbeat expiring, the
reconciler hands the job back, and a fresh worker finishes it with the files a clean run writes.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from sqlalchemy import update

from app.core.db import session_scope
from app.core.redis import get_redis
from app.core.storage import get_storage
from app.evaluations.models import Evaluation
from app.exports.models import Export
from app.jobs import submit
from app.jobs.reconcile import reconcile
from app.volumes.models import Volume
from tests.conftest import ROOT
from tests.helpers_exporteval import upload_ct_cases

H = "researcher"
HEARTBEAT_S = 3
MODELS: dict[str, Any] = {"export": Export, "evaluation": Evaluation}


def _export(client: Any, tokens: Any, dataset_id: int, number: int) -> Any:
    return client.post(f"/api/v1/datasets/{dataset_id}/exports",
                       json={"dataset_number": number, "label_source": "reference"}, headers=tokens.headers(H))


def _references_as_predictions(volumes: dict[str, dict[str, Any]]) -> bytes:
    """A zip of {case}.nii.gz: each case's stored reference (dataset values, the image's grid)."""
    buffer = io.BytesIO()
    storage = get_storage()
    with zipfile.ZipFile(buffer, "w") as zf, session_scope() as session:
        for case_id, volume in volumes.items():
            row = session.get(Volume, volume["id"])
            assert row is not None and row.reference_key is not None
            zf.writestr(f"{case_id}.nii.gz", storage.read_bytes(row.reference_key))
    return buffer.getvalue()


def _evaluation(client: Any, tokens: Any, dataset_id: int, predictions: bytes) -> Any:
    return client.post(f"/api/v1/datasets/{dataset_id}/evaluations", files={"predictions": ("p.zip", predictions)},
                       headers=tokens.headers(H))


def _row(kind: str, row_id: int) -> Any:
    with session_scope() as session:
        row = session.get(MODELS[kind], row_id)
        assert row is not None
        session.expunge(row)
        return row


def _wait(kind: str, row_id: int, ready: Callable[[Any], bool], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _row(kind, row_id)
        if ready(row):
            return row
        time.sleep(0.01)
    raise AssertionError(f"timed out; row {vars(_row(kind, row_id))}; worker log:\n{log.read_text()[-4000:]}")


class CpuWorker:
    """``crowdsam worker -q cpu`` in its own process group (with its scheduler/reconciler child)."""

    def __init__(self, log: Path, **env: str) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "-q", "cpu"],
            cwd=ROOT, env={**os.environ, "CROWDSAM_STORAGE_URL": get_storage().root, **env},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def _stored_files(prefix: str) -> list[str]:
    root = Path(get_storage().root) / prefix
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["export", "evaluation"])
def test_a_silent_worker_is_noticed_by_its_heartbeat_and_the_job_finishes_elsewhere(
    client: Any, tokens: Any, dataset: dict[str, Any], run_jobs: Any, tmp_path: Path, kind: str
) -> None:
    volumes = upload_ct_cases(client, tokens, dataset["id"])
    predictions = _references_as_predictions(volumes)

    numbers = iter((301, 302))

    def request() -> int:
        response = (_export(client, tokens, dataset["id"], next(numbers))
                    if kind == "export" else _evaluation(client, tokens, dataset["id"], predictions))
        assert response.status_code == 202, response.text
        return int(response.json()["id"])

    row_id = request()
    log = tmp_path / "worker.log"
    lost = CpuWorker(log, CROWDSAM_JOB_HEARTBEAT_S=str(HEARTBEAT_S))
    try:
        _wait(kind, row_id, lambda r: r.status == "running", 120, log)
        lost.signal(signal.SIGSTOP)  # frozen mid-job: no heartbeat, no progress (a lost host looks the same)
        frozen = _row(kind, row_id)
        assert frozen.status == "running", "the job finished before the worker could be frozen"
        assert frozen.result is None

        time.sleep(HEARTBEAT_S + 1)
        done = reconcile(grace_s=3600)  # only the heartbeat decides here, not the rows' age
        handed_back = _row(kind, row_id)
        assert handed_back.status == "queued", vars(handed_back)
        assert "handed back for a retry" in (handed_back.error or "")
        job = Job.fetch(f"{kind}-{row_id}", connection=get_redis())
        assert job.get_status() == RQStatus.SCHEDULED and job.retries_left == 1
        assert not done  # the failure callback did the row update, nothing else to repair
        assert client.get(f"/api/v1/{kind}s/{row_id}", headers=tokens.headers(H)).json()["status"] == "queued"
    finally:
        lost.signal(signal.SIGKILL)
        lost.stop()

    fresh = CpuWorker(log)
    try:
        finished = _wait(kind, row_id, lambda r: r.status in ("finished", "failed", "canceled"), 180, log)
    finally:
        fresh.stop()
    assert finished.status == "finished" and finished.error is None and finished.attempts == 2, vars(finished)

    clean_id = request()
    run_jobs("cpu")
    clean = _row(kind, clean_id)
    assert clean.status == "finished" and clean.attempts == 1
    if kind == "export":
        # Same case files, byte for byte; nothing in the store beyond the result's files and the archive.
        def case_files(row: Any) -> dict[str, str]:  # imagesTr/labelsTr files below the DatasetXXX_Name folder
            return {f["path"].split("/", 1)[1]: f["sha256"] for f in row.result["files"] if "sTr/" in f["path"]}

        assert case_files(finished) and case_files(finished) == case_files(clean)
        expected = sorted([f["path"] for f in finished.result["files"]] + [finished.result["archive"]["path"]])
        assert _stored_files(f"exports/{row_id}") == expected
    else:
        assert finished.result["cases"] == clean.result["cases"]
        assert finished.result["mean"] == clean.result["mean"]
        assert all(metrics["Dice"] == 1.0 for case in finished.result["cases"]
                   for name, metrics in case["metrics"].items())


def test_enqueue_lost_after_the_commit_is_repaired_by_the_reconciler(
    client: Any, tokens: Any, dataset: dict[str, Any], run_jobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_ct_cases(client, tokens, dataset["id"])

    def redis_gone(*_: Any) -> None:
        raise RedisConnectionError("Redis went away between the commit and the enqueue")

    monkeypatch.setattr(submit, "enqueue", redis_gone)
    response = _export(client, tokens, dataset["id"], 411)
    assert response.status_code == 202, response.text  # the row is committed: the job will run
    export_id = response.json()["id"]
    monkeypatch.undo()
    assert Job.fetch_many([f"export-{export_id}"], connection=get_redis()) == [None]
    assert _row("export", export_id).status == "queued"

    assert reconcile(grace_s=60)["enqueued"] == 0  # too young: its enqueue may still be under way
    assert reconcile(grace_s=0)["enqueued"] == 1
    assert reconcile(grace_s=0)["enqueued"] == 0  # once
    run_jobs("cpu")
    row = _row("export", export_id)
    assert row.status == "finished" and row.attempts == 1 and row.archive_key is not None


def test_cancel_works_for_exports_queued_or_running(
    client: Any, tokens: Any, dataset: dict[str, Any], run_jobs: Any
) -> None:
    from app.jobs.runner import run_job
    from workers.exporter import export

    upload_ct_cases(client, tokens, dataset["id"])
    queued_id = _export(client, tokens, dataset["id"], 421).json()["id"]
    canceled = client.post(f"/api/v1/exports/{queued_id}/cancel", headers=tokens.headers(H))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert client.post(f"/api/v1/exports/{queued_id}/cancel", headers=tokens.headers(H)).status_code == 409
    assert Job.fetch(f"export-{queued_id}", connection=get_redis()).get_status() == RQStatus.CANCELED
    run_jobs("cpu")
    assert _row("export", queued_id).status == "canceled" and _stored_files(f"exports/{queued_id}") == []

    running_id = _export(client, tokens, dataset["id"], 422).json()["id"]
    seen: dict[str, Any] = {}

    def cancel_then_export(context: Any) -> dict[str, Any]:
        response = client.post(f"/api/v1/exports/{running_id}/cancel", headers=tokens.headers(H))
        seen.update(response.json())
        return export(context)

    assert run_job("export", running_id, cancel_then_export) == {"job": f"export-{running_id}", "status": "canceled"}
    assert seen["status"] == "running" and seen["cancel_requested"] is True
    row = _row("export", running_id)
    assert row.status == "canceled" and row.result is None and row.archive_key is None
    assert client.get(f"/api/v1/exports/{running_id}/archive", headers=tokens.headers(H)).status_code == 409


def test_export_errors_transient_retry_permanent_fail(
    client: Any, tokens: Any, dataset: dict[str, Any], run_jobs: Any
) -> None:
    volumes = upload_ct_cases(client, tokens, dataset["id"])
    with session_scope() as session:
        image_key = session.get(Volume, volumes["sm"]["id"]).image_key  # type: ignore[union-attr]
    image = Path(get_storage().root) / image_key
    hidden = image.with_name("hidden")

    transient_id = _export(client, tokens, dataset["id"], 431).json()["id"]
    image.rename(hidden)  # the store briefly cannot read a file
    try:
        run_jobs("cpu")
    finally:
        hidden.rename(image)
    row = _row("export", transient_id)
    assert row.status == "queued" and row.attempts == 1, vars(row)  # never a "failed" that later runs again
    assert "retrying in 5 s" in row.error and "FileNotFoundError" in row.error
    assert Job.fetch(f"export-{transient_id}", connection=get_redis()).get_status() == RQStatus.SCHEDULED

    permanent_id = _export(client, tokens, dataset["id"], 432).json()["id"]
    with session_scope() as session:  # a row whose parameters no longer validate (e.g. written by a bad migration)
        params = _row("export", permanent_id).params
        params["cases"][0]["split"] = "validation"
        session.execute(update(Export).where(Export.id == permanent_id).values(params=params))
        session.commit()
    run_jobs("cpu")
    row = _row("export", permanent_id)
    assert row.status == "failed" and row.attempts == 1 and "split" in row.error, vars(row)
    job = Job.fetch(f"export-{permanent_id}", connection=get_redis())
    assert job.get_status() == RQStatus.FAILED and job.retries_left == 0


def test_nan_in_progress_and_results_is_stored_as_null(
    client: Any, tokens: Any, dataset: dict[str, Any], run_jobs: Any
) -> None:
    """nnU-Net's pseudo-Dice of an organ absent from the validation patches is NaN: JSONB refuses NaN, so the
    runner writes progress and result columns as strict JSON (null) instead of failing the job."""
    from app.jobs.runner import run_job

    upload_ct_cases(client, tokens, dataset["id"])
    export_id = _export(client, tokens, dataset["id"], 441).json()["id"]
    seen: dict[str, Any] = {}

    def nan_handler(context: Any) -> dict[str, Any]:
        context.progress(1, 2, pseudo_dice={"spleen": float("nan"), "liver": 0.5}, loss=np.float32("inf"))
        seen.update(_row("export", export_id).progress)
        return {"result": {"dice": [float("nan"), np.float64(0.25)], 3: np.int64(7)}}

    assert run_job("export", export_id, nan_handler)["status"] == "finished"
    assert seen == {"done": 1, "total": 2, "pseudo_dice": {"spleen": None, "liver": 0.5}, "loss": None}
    assert _row("export", export_id).result == {"dice": [None, 0.25], "3": 7}
