"""Segmentation jobs on a real RQ worker: idempotency, engine caches across reruns, cancel while
running, retry with backoff on a transient error, immediate failure on a permanent one."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from rq import SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from sqlalchemy import update

from app.core.db import session_scope
from app.core.redis import get_queue, get_redis
from app.core.storage import get_storage
from app.segmentations.models import Segmentation
from tests.conftest import CT_DIR, TOTALSEG_MAP, upload
from tests.segmentation_helpers import ORGANS, canonical_reference, post_boxes, reference_boxes, reoriented_copy

pytestmark = pytest.mark.model

SM_IMAGE, SM_REF = CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz"


def _fresh_volume(client, tokens, dataset, tmp_path: Path) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """A copy of example_ct_sm with a unique sha256: no embedding cache has seen it."""
    image, ref = reoriented_copy(tmp_path, SM_IMAGE, SM_REF, ("R", "A", "S"), tag=uuid.uuid4().hex[:8])
    response = upload(client, tokens, dataset["id"], image, ref, case_id=f"fresh-{uuid.uuid4().hex[:6]}",
                      reference_map=json.dumps(TOTALSEG_MAP), reference_other="background")
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _boxes(slices: list[int], labels: tuple[str, ...] = ("liver", "spleen")) -> list[dict]:  # type: ignore[type-arg]
    return reference_boxes(canonical_reference(SM_REF), {n: ORGANS[n] for n in labels}, slices)


def _request(client, tokens, volume_id: int, **body) -> int:  # type: ignore[no-untyped-def]
    response = client.post(f"/api/v1/volumes/{volume_id}/segmentations", json=body,
                           headers=tokens.headers("researcher"))
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


def _get(client, tokens, sid: int) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return client.get(f"/api/v1/segmentations/{sid}", headers=tokens.headers("researcher")).json()  # type: ignore[no-any-return]


def test_same_inputs_give_the_same_bytes_and_one_added_box_decodes_one_slice(  # type: ignore[no-untyped-def]
    client, tokens, sm_volume, run_jobs
) -> None:
    vid = sm_volume["id"]
    boxes = _boxes([14, 15, 16])
    for box in boxes:  # prompts no other test posts: decoder outputs are cached per prompt across the session
        box["box"][0] += 0.37
    post_boxes(client, tokens.headers("annotator"), vid, boxes)
    first = _request(client, tokens, vid)
    run_jobs()
    a = _get(client, tokens, first)
    assert a["status"] == "finished", a
    assert a["stats"]["decoded"] == 3 and 0 <= a["stats"]["encoded"] <= 3  # earlier tests may have encoded them

    again = _request(client, tokens, vid)
    run_jobs()
    b = _get(client, tokens, again)
    assert b["status"] == "finished"
    assert b["mask_sha256"] == a["mask_sha256"]  # bit-identical NIfTI
    assert (b["stats"]["encoded"], b["stats"]["decoded"]) == (0, 0)
    assert b["stats"]["per_slice"] == a["stats"]["per_slice"]

    # A second annotator adds one box on slice 15 (1 px off the first's, a new decoder prompt): embeddings come
    # from the cache, one slice re-decodes (an identical box would need no decoder: outputs are cached per prompt).
    extra = [box for box in boxes if box["slice"] == 15 and box["label"] == "liver"][:1]
    extra = [{**extra[0], "box": [extra[0]["box"][0] + 1, *extra[0]["box"][1:]]}]
    post_boxes(client, tokens.headers("annotator2"), vid, extra)
    rerun = _request(client, tokens, vid)
    run_jobs()
    c = _get(client, tokens, rerun)
    assert c["status"] == "finished"
    assert (c["stats"]["encoded"], c["stats"]["decoded"]) == (0, 1)
    assert c["stats"]["per_slice"]["15"]["liver"]["annotators"] == ["annotator", "annotator2"]
    assert c["stats"]["per_slice"]["14"] == a["stats"]["per_slice"]["14"]


def test_cancel_stops_a_running_job_at_its_next_slice(client, tokens, dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from workers.jobs.segment import run_segmentation

    volume = _fresh_volume(client, tokens, dataset, tmp_path)
    post_boxes(client, tokens.headers("annotator"), volume["id"], _boxes(list(range(0, 24, 2))))
    sid = _request(client, tokens, volume["id"])
    result: dict = {}  # type: ignore[type-arg]
    worker = threading.Thread(target=lambda: result.update(run_segmentation(sid)))
    worker.start()
    deadline = time.monotonic() + 120
    while _get(client, tokens, sid)["progress"]["done"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    running = _get(client, tokens, sid)
    assert running["status"] == "running" and 1 <= running["progress"]["done"] < 12, running
    response = client.post(f"/api/v1/segmentations/{sid}/cancel", headers=tokens.headers("researcher"))
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    worker.join(timeout=120)
    assert result == {"job": f"segmentation-{sid}", "status": "canceled"}
    seg = _get(client, tokens, sid)
    assert seg["status"] == "canceled" and seg["mask_url"] is None and seg["progress"]["done"] < 12
    assert not get_storage().exists(f"volumes/{volume['id']}/segmentations/{sid}/mask.nii.gz")


def test_transient_error_is_retried_with_backoff_then_finishes(client, tokens, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    post_boxes(client, tokens.headers("annotator"), vid, _boxes([20]))
    sid = _request(client, tokens, vid)
    storage = get_storage()
    canonical = Path(storage.root) / f"volumes/{vid}/canonical.npy"
    hidden = canonical.with_suffix(".hidden")
    shutil.move(canonical, hidden)  # the canonical cache is briefly unreadable (e.g. a network store hiccup)

    run_jobs()
    seg = _get(client, tokens, sid)
    assert seg["status"] == "queued" and seg["attempts"] == 1
    assert "FileNotFoundError" in seg["error"] and "retrying in 5 s" in seg["error"]
    job = Job.fetch(f"segmentation-{sid}", connection=get_redis())
    assert job.get_status() == JobStatus.SCHEDULED and job.retries_left == 2
    assert job.id in ScheduledJobRegistry("sam", connection=get_redis()).get_job_ids()

    shutil.move(hidden, canonical)
    time.sleep(5.5)  # the first backoff interval; the worker's scheduler then enqueues the retry
    SimpleWorker([get_queue("sam")], connection=get_redis()).work(burst=True, with_scheduler=True)
    seg = _get(client, tokens, sid)
    assert seg["status"] == "finished" and seg["attempts"] == 2 and seg["error"] is None
    assert seg["mask_url"] is not None


def test_permanent_error_fails_at_once_with_the_reason(client, tokens, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    post_boxes(client, tokens.headers("annotator"), vid, _boxes([21]))
    sid = _request(client, tokens, vid)
    with session_scope() as session:  # the checkpoint vanished between the request and the run
        session.execute(update(Segmentation).where(Segmentation.id == sid).values(model="sam_vit_h"))
        session.commit()
    run_jobs()
    seg = _get(client, tokens, sid)
    assert seg["status"] == "failed" and seg["attempts"] == 1
    assert "sam_vit_h" in seg["error"] and "unavailable" in seg["error"]
    assert seg["mask_url"] is None
    job = Job.fetch(f"segmentation-{sid}", connection=get_redis())
    assert job.get_status() == JobStatus.FAILED and job.retries_left == 0
    assert job.id not in ScheduledJobRegistry("sam", connection=get_redis()).get_job_ids()
