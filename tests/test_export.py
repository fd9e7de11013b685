"""nnU-Net v2 export over the API: validation before work, the written folder, nnU-Net's own integrity check."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import ABDOMEN_LABELS, CT_DIR
from tests.helpers_exporteval import add_finished_segmentation, reference_array, upload_case, upload_ct_cases

EXPECTED_EXPORT_LABELS = {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 4, "aorta": 5}
LUT = np.zeros(53, dtype=np.int32)
for _name, _value in ABDOMEN_LABELS.items():
    LUT[_value] = EXPECTED_EXPORT_LABELS[_name]


def post_export(client, tokens, dataset_id: int, **body):  # type: ignore[no-untyped-def]
    payload = {"format": "nnunet-v2", "dataset_number": 501, **body}
    return client.post(f"/api/v1/datasets/{dataset_id}/exports", json=payload, headers=tokens.headers("researcher"))


def finished_export(client, tokens, run_jobs, dataset_id: int, **body) -> dict:  # type: ignore[no-untyped-def]
    response = post_export(client, tokens, dataset_id, **body)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    run_jobs("cpu")
    out = client.get(f"/api/v1/exports/{response.json()['id']}", headers=tokens.headers("researcher")).json()
    assert out["status"] == "finished", out
    return dict(out)


def extract_archive(client, tokens, export: dict, target: Path) -> Path:  # type: ignore[no-untyped-def]
    response = client.get(f"/api/v1/exports/{export['id']}/archive", headers=tokens.headers("researcher"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    assert hashlib.sha256(response.content).hexdigest() == export["archive"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return target / export["folder"]


# nnU-Net's integrity check starts a multiprocessing Pool (12 processes by default, fork start
# method) in create_lists_from_splitted_dataset_folder; forked from this threaded test process it can
# deadlock. It runs in a fresh interpreter that spawns its children, under a time limit.
NNUNET_VERIFY = """
import multiprocessing, sys
multiprocessing.set_start_method("spawn")
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
verify_dataset_integrity(sys.argv[1], num_processes=1)
"""


def verify_with_nnunet(folder: Path) -> None:
    """nnU-Net's own check; it only *prints* geometry warnings, so its output is checked too."""
    env = {**os.environ, **{var: str(folder.parent / var)
                            for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    done = subprocess.run([sys.executable, "-c", NNUNET_VERIFY, str(folder)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify_dataset_integrity Done" in done.stdout
    assert "Error" not in done.stdout and "Warning" not in done.stdout, done.stdout


def test_invalid_exports_are_refused_before_any_work(client, tokens, dataset):  # type: ignore[no-untyped-def]
    from rq import Queue

    from app.core.redis import get_redis

    did = dataset["id"]
    # no train case yet
    assert "no train cases" in post_export(client, tokens, did).json()["detail"]
    upload_case(client, tokens, did, "sm", CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz")
    upload_case(client, tokens, did, "noref", CT_DIR / "example_ct_sm.nii.gz", None)
    cases = [
        ({"dataset_number": 5}, "reserved"),
        ({"dataset_number": 10}, "reserved"),
        ({"dataset_number": 1000}, "1..999"),
        ({"dataset_number": 0}, "1..999"),
        ({"dataset_name": "bad name/.."}, "dataset_name"),
        ({"format": "nnunet-v1"}, "nnunet-v2"),
        ({"label_source": "reference"}, "without a reference map: ['noref']"),
        ({"label_source": "reference", "unprompted": "ignore"}, "needs label_source 'segmentation'"),
        ({"label_source": "segmentation", "model": "no_such_model"}, "unknown model 'no_such_model'"),
        ({"label_source": "segmentation", "model": "litemedsam"}, "no finished 'litemedsam' segmentation"),
    ]
    for body, message in cases:
        response = post_export(client, tokens, did, **body)
        assert response.status_code == 422, (body, response.text)
        assert message in json.dumps(response.json()["detail"]), (body, response.json())
    assert Queue("cpu", connection=get_redis()).count == 0
    assert client.get("/api/v1/exports/1", headers=tokens.headers("researcher")).status_code == 404
    # annotators may not export
    response = client.post(f"/api/v1/datasets/{did}/exports", json={"dataset_number": 501},
                           headers=tokens.headers("annotator"))
    assert response.status_code == 403


def test_reference_export_passes_nnunet_integrity(client, tokens, dataset, run_jobs, tmp_path):  # type: ignore[no-untyped-def]
    did = dataset["id"]
    volumes = upload_ct_cases(client, tokens, did)
    test_case = upload_case(client, tokens, did, "smtest", CT_DIR / "example_ct_sm.nii.gz",
                            CT_DIR / "example_seg.nii.gz", split="test")
    export = finished_export(client, tokens, run_jobs, did, label_source="reference", dataset_name="Abdomen")

    assert export["folder"] == "Dataset501_Abdomen"
    paths = {f["path"] for f in export["files"]}
    assert paths == {
        "Dataset501_Abdomen/dataset.json", "Dataset501_Abdomen/README.md",
        "Dataset501_Abdomen/imagesTr/ct_0000.nii.gz", "Dataset501_Abdomen/labelsTr/ct.nii.gz",
        "Dataset501_Abdomen/imagesTr/sm_0000.nii.gz", "Dataset501_Abdomen/labelsTr/sm.nii.gz",
        "Dataset501_Abdomen/imagesTs/smtest_0000.nii.gz", "Dataset501_Abdomen/labelsTs/smtest.nii.gz",
    }
    meta = export["dataset_json"]
    assert meta["labels"] == EXPECTED_EXPORT_LABELS
    assert meta["label_values_original"] == ABDOMEN_LABELS
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "CT"}
    assert "fingerprint" not in meta["crowdsam"]  # only ignore exports need one (tests/test_export_fingerprint.py)

    folder = extract_archive(client, tokens, export, tmp_path)
    for row in export["files"]:  # the archive holds exactly the listed files, with the listed checksums
        data = (tmp_path / row["path"]).read_bytes()
        assert len(data) == row["size"] and hashlib.sha256(data).hexdigest() == row["sha256"]
    # images are the uploads, byte for byte; labels are the references remapped to 0..5 on the same header
    assert (folder / "imagesTr/ct_0000.nii.gz").read_bytes() == (CT_DIR / "example_ct.nii.gz").read_bytes()
    for case, vol in [*volumes.items(), ("smtest", test_case)]:
        sub = "labelsTs" if case == "smtest" else "labelsTr"
        label_img = nib.load(str(folder / sub / f"{case}.nii.gz"))
        image = nib.load(str(folder / ("imagesTs" if case == "smtest" else "imagesTr") / f"{case}_0000.nii.gz"))
        ref, _ = reference_array(vol["id"])
        np.testing.assert_array_equal(np.asarray(label_img.dataobj), LUT[ref])
        assert label_img.shape == image.shape
        np.testing.assert_array_equal(label_img.header.get_sform(), image.header.get_sform())
        np.testing.assert_array_equal(label_img.header.get_qform(), image.header.get_qform())
        assert label_img.header["sform_code"] == image.header["sform_code"]
        assert label_img.header["qform_code"] == image.header["qform_code"]
    verify_with_nnunet(folder)


@pytest.mark.parametrize("unprompted", ["background", "ignore"])
def test_segmentation_export_passes_nnunet_integrity(client, tokens, dataset, run_jobs, tmp_path,  # type: ignore[no-untyped-def]
                                                     unprompted):
    from app.imaging.coords import Orientation

    did = dataset["id"]
    volumes = upload_ct_cases(client, tokens, did)
    segs = {case: add_finished_segmentation(vol["id"]) for case, vol in volumes.items()}
    add_finished_segmentation(volumes["sm"]["id"], model="sam_vit_b")  # another model: must not be used
    export = finished_export(client, tokens, run_jobs, did, label_source="segmentation", model="litemedsam",
                             unprompted=unprompted, dataset_number=502)
    folder = extract_archive(client, tokens, export, tmp_path)
    meta = json.loads((folder / "dataset.json").read_text())
    if unprompted == "ignore":
        assert meta["labels"] == {**EXPECTED_EXPORT_LABELS, "ignore": 6}
        assert (folder / "dataset_fingerprint.json").exists()
        assert meta["crowdsam"]["fingerprint"]["file"] == "dataset_fingerprint.json"
    else:
        assert meta["labels"] == EXPECTED_EXPORT_LABELS
        assert not (folder / "dataset_fingerprint.json").exists()
    assert "nnUNetv2_plan_and_preprocess -d 502" in (folder / "README.md").read_text()
    for case, vol in volumes.items():
        seg_id, prompted, mask = segs[case]
        assert meta["crowdsam"]["cases"][case]["segmentation_id"] == seg_id
        labels = np.asarray(nib.load(str(folder / "labelsTr" / f"{case}.nii.gz")).dataobj).astype(np.int32)
        orientation = Orientation.from_affine(vol["affine"], vol["shape"])
        canonical = np.asarray(orientation.canonical(labels))
        expected = np.asarray(orientation.canonical(LUT[mask]))
        unprompted_k = [k for k in range(canonical.shape[2]) if k not in prompted]
        np.testing.assert_array_equal(canonical[:, :, prompted], expected[:, :, prompted])
        if unprompted == "ignore":
            assert np.all(canonical[:, :, unprompted_k] == 6)
            assert meta["crowdsam"]["cases"][case]["ignored_slices"] == len(unprompted_k)
        else:
            assert np.all(canonical[:, :, unprompted_k] == 0)
    verify_with_nnunet(folder)


def test_uncompressed_upload_is_exported_gzipped_unchanged(client, tokens, dataset, run_jobs, tmp_path):  # type: ignore[no-untyped-def]
    raw = tmp_path / "example_ct_sm.nii"
    raw.write_bytes(gzip.decompress((CT_DIR / "example_ct_sm.nii.gz").read_bytes()))
    upload_case(client, tokens, dataset["id"], "plain", raw, CT_DIR / "example_seg.nii.gz")
    export = finished_export(client, tokens, run_jobs, dataset["id"], label_source="reference")
    folder = extract_archive(client, tokens, export, tmp_path / "x")
    exported = folder / "imagesTr" / "plain_0000.nii.gz"
    assert gzip.decompress(exported.read_bytes()) == raw.read_bytes()
    a, b = nib.load(str(exported)), nib.load(str(raw))
    assert a.header.binaryblock == b.header.binaryblock
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert export["folder"] == "Dataset501_abdomen"  # default name: the dataset's name


def test_archive_before_finish_is_409_and_store_untouched_until_done(client, tokens, dataset):  # type: ignore[no-untyped-def]
    from app.core.storage import get_storage

    upload_case(client, tokens, dataset["id"], "sm", CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz")
    response = post_export(client, tokens, dataset["id"], label_source="reference")
    assert response.status_code == 202
    eid = response.json()["id"]
    assert client.get(f"/api/v1/exports/{eid}/archive", headers=tokens.headers("researcher")).status_code == 409
    assert not get_storage().exists(f"exports/{eid}")


@pytest.mark.parametrize("derived", ["ignore", "known"])
def test_gap_filled_slices_are_ignored_or_known_on_request(client, tokens, dataset, run_jobs, tmp_path,  # type: ignore[no-untyped-def]
                                                           derived):
    from app.imaging.coords import Orientation

    did = dataset["id"]
    volumes = upload_ct_cases(client, tokens, did)
    prompted, filled = {}, {}
    for case, vol in volumes.items():
        n = vol["canonical_shape"][2]
        prompted[case] = list(range(2, n - 2, 4))
        filled[case] = [k + 1 for k in prompted[case][:-1]]
        add_finished_segmentation(vol["id"], prompted=prompted[case], derived=filled[case])
    export = finished_export(client, tokens, run_jobs, did, label_source="segmentation", model="litemedsam",
                             unprompted="ignore", derived=derived, dataset_number=503)
    assert export["params"]["derived"] == derived
    folder = extract_archive(client, tokens, export, tmp_path)
    for case, vol in volumes.items():
        labels = np.asarray(nib.load(str(folder / "labelsTr" / f"{case}.nii.gz")).dataobj).astype(np.int32)
        canonical = np.asarray(Orientation.from_affine(vol["affine"], vol["shape"]).canonical(labels))
        assert not np.any(canonical[:, :, prompted[case]] == 6)
        if derived == "known":
            assert not np.any(canonical[:, :, filled[case]] == 6)
            assert canonical[:, :, filled[case]].any()  # the derived labels themselves
        else:
            assert np.all(canonical[:, :, filled[case]] == 6)
