"""The artefact paths against a real S3 API (moto's server, tests/s3.py), ``CROWDSAM_STORAGE_URL=s3://...``:
uploads with a reference, slice PNGs and downloads, an nnU-Net export and its archive, deletes that remove the
objects, readiness naming a missing bucket; with the model: a segmentation job and its mask, and two real
``crowdsam worker`` processes with separate embedding caches sharing the one store.

A representative subset of the API tests, not the whole suite twice: every other module runs on the local store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.config import get_settings
from app.core.storage import Storage, get_storage
from tests.conftest import CT_DIR, ROOT, TOTALSEG_MAP, upload
from tests.s3 import environ, s3_env
from tests.segmentation_helpers import ORGANS, canonical_reference, load_mask, post_boxes, reference_boxes

BUCKET = "crowdsam-api-tests"
SM_IMAGE, SM_REF = CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz"


def _reset_caches() -> None:
    from app import health
    from app.volumes import slices

    get_settings.cache_clear()
    get_storage.cache_clear()
    slices._cache.clear()
    health._last_check = (-health.CHECK_TTL_S, {})


@pytest.fixture(scope="module", autouse=True)
def s3_store() -> Iterator[dict[str, str]]:
    """This module's app stores artefacts in the moto bucket; settings and caches are restored afterwards."""
    env = {**s3_env(BUCKET), "CROWDSAM_STORAGE_URL": f"s3://{BUCKET}/store-{uuid.uuid4().hex[:8]}"}
    get_storage().clear()  # the session's local store: _local_store_is_unused sees only this module's writes
    with environ(env):
        _reset_caches()
        try:
            assert not get_storage().is_local and get_storage().is_s3
            yield env
            get_storage().clear()
        finally:
            _reset_caches()
    _reset_caches()


def objects(prefix: str = "") -> set[str]:
    """Keys of the store's objects under ``prefix``, read with a separate client (as another host would)."""
    other = Storage(os.environ["CROWDSAM_STORAGE_URL"], {"skip_instance_cache": True})
    root = f"{other.root}/{prefix}".rstrip("/")
    return {path.removeprefix(f"{other.root}/") for path in other.fs.find(root)}


def _local_store_is_unused() -> bool:
    local = get_settings().data_dir / "store"
    return not local.exists() or not any(p.is_file() for p in local.rglob("*"))


def upload_sm(client: Any, tokens: Any, dataset_id: int, case_id: str = "sm") -> dict[str, Any]:
    response = upload(client, tokens, dataset_id, SM_IMAGE, SM_REF, case_id=case_id,
                      reference_map=json.dumps(TOTALSEG_MAP), reference_other="background")
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_upload_slice_download_and_delete_on_s3(client, tokens, dataset):  # type: ignore[no-untyped-def]
    volume = upload_sm(client, tokens, dataset["id"])
    vid = volume["id"]
    stored = objects(f"volumes/{vid}")
    assert {f"volumes/{vid}/canonical.npy"} < stored and len(stored) >= 3, stored  # image, canonical, reference
    assert _local_store_is_unused()

    png = client.get(f"/api/v1/volumes/{vid}/slices/15.png", headers=tokens.headers("annotator"))
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    image = client.get(f"/api/v1/volumes/{vid}/image", headers=tokens.headers("researcher"))
    assert image.status_code == 200
    assert hashlib.sha256(image.content).hexdigest() == hashlib.sha256(SM_IMAGE.read_bytes()).hexdigest()
    reference = client.get(f"/api/v1/volumes/{vid}/reference", headers=tokens.headers("researcher"))
    assert reference.status_code == 200 and gzip.decompress(reference.content)[:4] in (b"\x5c\x01\x00\x00",
                                                                                       b"\x00\x00\x01\x5c")

    other = upload_sm(client, tokens, dataset["id"], case_id="other")
    assert client.delete(f"/api/v1/volumes/{vid}", headers=tokens.headers("researcher")).status_code == 204
    assert objects(f"volumes/{vid}") == set()
    assert objects(f"volumes/{other['id']}")  # a neighbour's objects stay


def test_reference_export_archive_on_s3(client, tokens, dataset, run_jobs, tmp_path):  # type: ignore[no-untyped-def]
    upload_sm(client, tokens, dataset["id"])
    response = client.post(f"/api/v1/datasets/{dataset['id']}/exports",
                           json={"format": "nnunet-v2", "dataset_number": 501, "label_source": "reference",
                                 "dataset_name": "Abdomen"}, headers=tokens.headers("researcher"))
    assert response.status_code == 202, response.text
    eid = response.json()["id"]
    run_jobs("cpu")
    export = client.get(f"/api/v1/exports/{eid}", headers=tokens.headers("researcher")).json()
    assert export["status"] == "finished", export
    stored = objects(f"exports/{eid}")
    assert f"exports/{eid}/{export['archive']['path']}" in stored
    assert {f"exports/{eid}/{row['path']}" for row in export["files"]} < stored

    archive = client.get(f"/api/v1/exports/{eid}/archive", headers=tokens.headers("researcher"))
    assert archive.status_code == 200 and archive.headers["content-length"] == str(export["archive"]["size"])
    assert hashlib.sha256(archive.content).hexdigest() == export["archive"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        assert {m.name for m in tar.getmembers() if m.isfile()} == {row["path"] for row in export["files"]}
        image = tar.extractfile(f"{export['folder']}/imagesTr/sm_0000.nii.gz")
        assert image is not None and image.read() == SM_IMAGE.read_bytes()

    assert client.delete(f"/api/v1/exports/{eid}", headers=tokens.headers("researcher")).status_code == 204
    assert objects(f"exports/{eid}") == set()
    assert _local_store_is_unused()


def test_readiness_names_a_missing_bucket(client, s3_store):  # type: ignore[no-untyped-def]
    from app import health

    assert client.get("/readyz").json()["storage"] == "ok"
    missing = {**s3_store, "CROWDSAM_STORAGE_URL": "s3://crowdsam-no-such-bucket/store"}
    with environ(missing):
        _reset_caches()
        try:
            response = client.get("/readyz")
        finally:
            get_settings.cache_clear()
            get_storage.cache_clear()
            health._last_check = (-health.CHECK_TTL_S, {})
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["database"] == "ok"
    assert body["storage"] == "error: bucket 'crowdsam-no-such-bucket' does not exist (create it first)"
    assert s3_store["AWS_SECRET_ACCESS_KEY"] not in response.text


# --- segmentation with the real LiteMedSAM ------------------------------------------------------------------

def _segment(client: Any, tokens: Any, volume_id: int, slices: list[int], shift: float = 0.0) -> int:
    boxes = reference_boxes(canonical_reference(SM_REF), {"liver": ORGANS["liver"]}, slices)
    for box in boxes:
        box["box"][0] += shift
    post_boxes(client, tokens.headers("annotator"), volume_id, boxes)
    response = client.post(f"/api/v1/volumes/{volume_id}/segmentations", json={},
                           headers=tokens.headers("researcher"))
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


def _finished_mask(client: Any, tokens: Any, sid: int) -> dict[str, Any]:
    seg = client.get(f"/api/v1/segmentations/{sid}", headers=tokens.headers("researcher")).json()
    assert seg["status"] == "finished", seg
    mask = client.get(f"/api/v1/segmentations/{sid}/mask", headers=tokens.headers("researcher"))
    assert mask.status_code == 200
    assert hashlib.sha256(mask.content).hexdigest() == seg["mask_sha256"]
    labels = np.asarray(load_mask(mask.content).dataobj)
    assert labels.shape == (122, 101, 30)
    assert set(np.unique(labels).tolist()) == {0, ORGANS["liver"]}
    assert seg["mask_url"] is not None and f"segmentations/{sid}/mask.nii.gz" in " ".join(objects())
    return dict(seg)


@pytest.mark.model
def test_segmentation_job_writes_its_mask_to_s3(client, tokens, dataset, run_jobs):  # type: ignore[no-untyped-def]
    vid = upload_sm(client, tokens, dataset["id"])["id"]
    sid = _segment(client, tokens, vid, [12], shift=0.29)
    assert run_jobs("sam")
    _finished_mask(client, tokens, sid)
    assert _local_store_is_unused()


class Worker:
    """``crowdsam worker --burst -q sam`` as a real subprocess with its own data dir (embedding caches)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}.log"
        data_dir.mkdir(parents=True)

    def run(self) -> None:
        # Own data dir (embedding and prompt caches); the ONNX export is shared with the session (exports are
        # keyed by weights and written under a lock), so each worker does not spend half a minute exporting.
        env = {**os.environ, "CROWDSAM_DATA_DIR": str(self.data_dir), "CROWDSAM_TORCH_THREADS": "2",
               "CROWDSAM_ONNX_DIR": str(get_settings().cache_dir / "onnx")}
        with self.log.open("ab") as log:
            done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--burst", "-q", "sam"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
        assert done.returncode == 0, self.log.read_text()[-4000:]

    def cache_files(self) -> set[Path]:
        cache = self.data_dir / "cache"
        return {p for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


@pytest.mark.model
def test_two_workers_with_their_own_caches_share_one_store(client, tokens, dataset, tmp_path):  # type: ignore[no-untyped-def]
    """Worker A segments volume 1; worker B (another host: own data dir, cold cache) segments volume 2 and
    re-runs volume 1's segmentation from the shared store: it encodes again (A's cache is not B's), and the
    mask is byte-identical to A's."""
    slices = [16]
    v1 = upload_sm(client, tokens, dataset["id"], case_id="one")["id"]
    v2 = upload_sm(client, tokens, dataset["id"], case_id="two")["id"]
    a, b = Worker(tmp_path / "host-a"), Worker(tmp_path / "host-b")

    first = _segment(client, tokens, v1, slices, shift=0.41)
    a.run()
    seg_a = _finished_mask(client, tokens, first)
    second = _segment(client, tokens, v2, slices, shift=0.43)
    again = client.post(f"/api/v1/volumes/{v1}/segmentations", json={}, headers=tokens.headers("researcher"))
    assert again.status_code == 202, again.text
    b.run()
    seg_second = _finished_mask(client, tokens, second)
    seg_b = _finished_mask(client, tokens, again.json()["id"])

    assert seg_b["mask_sha256"] == seg_a["mask_sha256"]  # same store inputs, same bytes, on either host
    # The two uploads are the same image (one embedding key): B encodes each slice once more, A's cache
    # stayed on A.
    assert seg_a["stats"]["encoded"] == len(slices)
    assert seg_second["stats"]["encoded"] + seg_b["stats"]["encoded"] == len(slices)
    cache_a, cache_b = a.cache_files(), b.cache_files()
    assert cache_a and cache_b and not cache_a & cache_b
    assert all(a.data_dir in p.parents for p in cache_a) and all(b.data_dir in p.parents for p in cache_b)
    for worker in (a, b):  # artefacts went to S3, not to a worker's disk
        assert not (worker.data_dir / "store").exists() or not any((worker.data_dir / "store").rglob("*.*"))


def test_worker_refuses_to_start_on_a_missing_bucket(tmp_path):  # type: ignore[no-untyped-def]
    """A typo in CROWDSAM_STORAGE_URL stops `crowdsam worker` at once with one line naming the bucket."""
    env = {**os.environ, "CROWDSAM_STORAGE_URL": "s3://no-such-crowdsam-bucket/store",
           "CROWDSAM_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--burst"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "bucket 'no-such-crowdsam-bucket' does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in done.stderr
