"""``crowdsam client``: the researcher CLI against a real server (``live_server``), through typer's CliRunner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from app.client import commands
from app.client.api import Api, retry_after
from tests.conftest import ABDOMEN_LABELS, CT_DIR, ROOT, TOTALSEG_MAP


def cli(url: str, token: str, *args: str) -> Any:
    result = CliRunner().invoke(commands.app, ["--url", url, "--token", token, *args])
    return result


def ok(result: Any) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    """sm.nii.gz + sm_seg.nii.gz beside it, and a case folder ``folder2/`` with labels/folder2.nii.gz."""
    root = tmp_path / "cases"
    (root / "folder2").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "sm.nii.gz").symlink_to(CT_DIR / "example_ct_sm.nii.gz")
    (root / "sm_seg.nii.gz").symlink_to(CT_DIR / "example_seg.nii.gz")
    (root / "folder2" / "ct.nii.gz").symlink_to(CT_DIR / "example_ct_sm.nii.gz")
    (root / "labels" / "folder2.nii.gz").symlink_to(CT_DIR / "example_seg.nii.gz")
    (root / "notes.txt").write_text("not a case")
    return root


def test_find_cases(cases: Path) -> None:
    found = commands.find_cases(cases)
    assert [(c.case_id, c.image.name, c.dicom, c.reference and c.reference.relative_to(cases).as_posix())
            for c in found] == [("folder2", "ct.nii.gz", False, "labels/folder2.nii.gz"),
                                ("sm", "sm.nii.gz", False, "sm_seg.nii.gz")]


def test_dataset_upload_idempotent_coco_round_trip(live_server, tokens, cases, tmp_path):  # type: ignore[no-untyped-def]
    url, token = live_server, tokens.researcher
    labels = json.dumps(ABDOMEN_LABELS)
    dataset_id = int(ok(cli(url, token, "datasets", "create", "cli-abdomen", "--labels", labels,
                            "--annotator", "annotator", "--prompt-classes", '{"0": "kidney_left"}')).stdout.strip())
    listed = json.loads(ok(cli(url, token, "datasets", "list", "--json")).stdout)
    assert [d["id"] for d in listed] == [dataset_id]

    (tmp_path / "map.json").write_text(json.dumps(TOTALSEG_MAP))
    args = ["upload", str(dataset_id), str(cases), "--reference-map", f"@{tmp_path / 'map.json'}",
            "--reference-other", "background"]
    first = json.loads(ok(cli(url, token, *args)).stdout)
    assert first == {"uploaded": ["folder2", "sm"], "skipped": [], "failed": []}
    again = json.loads(ok(cli(url, token, *args)).stdout)
    assert again == {"uploaded": [], "skipped": ["folder2", "sm"], "failed": []}

    with Api(url, token) as api:
        volumes = {v["case_id"]: v for v in api.pages(f"/datasets/{dataset_id}/volumes")}
        assert sorted(volumes) == ["folder2", "sm"] and all(v["has_reference"] for v in volumes.values())
        w, h = volumes["sm"]["display_size"]

    coco = {
        "images": [{"id": 1, "file_name": "imgsm-slice004.png", "width": w, "height": h},
                   {"id": 2, "file_name": "imgfolder2-slice010.png"}],
        "categories": [{"id": 5, "name": "liver"}, {"id": 1, "name": "spleen"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [3, 4, 10, 12]},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1.5, 2.5, 5, 6]}],
    }
    (tmp_path / "in.json").write_text(json.dumps(coco))
    imported = json.loads(ok(cli(url, token, "prompts", "import-coco", str(dataset_id), str(tmp_path / "in.json"),
                                 "--annotator", "alice")).stdout)
    assert imported["stored"] == 2 and imported["volumes"] == {"sm": 1, "folder2": 1}

    (tmp_path / "imgsm-slice006.txt").write_text("0 0.5 0.5 0.2 0.1\n")
    yolo = json.loads(ok(cli(url, token, "prompts", "import-yolo", str(dataset_id),
                             str(tmp_path / "imgsm-slice006.txt"), "--annotator", "bob")).stdout)
    assert yolo["stored"] == 1

    out = tmp_path / "out" / "all.coco.json"
    ok(cli(url, token, "prompts", "export-coco", str(dataset_id), str(out)))
    exported = json.loads(out.read_text())
    assert not list(out.parent.glob("*.part"))
    images = {im["id"]: im for im in exported["images"]}
    names = {c["id"]: c["name"] for c in exported["categories"]}
    assert sorted((images[a["image_id"]]["file_name"], names[a["category_id"]], a["bbox"], a["crowdsam"]["annotator"])
                  for a in exported["annotations"] if a["crowdsam"]["annotator"] == "alice") == [
        ("imgfolder2-slice010.png", "spleen", [1.5, 2.5, 5.0, 6.0], "alice"),
        ("imgsm-slice004.png", "liver", [3.0, 4.0, 10.0, 12.0], "alice")]
    assert len(exported["annotations"]) == 3  # with bob's YOLO box
    # The merged export re-imports as the same boxes: all duplicates.
    replay = json.loads(ok(cli(url, token, "prompts", "import-coco", str(dataset_id), str(out))).stdout)
    assert replay["boxes"] == 3 and replay["duplicates"] == 3

    queued = json.loads(ok(cli(url, token, "segment", str(dataset_id), "--label", "liver")).stdout)
    assert len(queued["ids"]) == 1 and queued["skipped"] == [volumes["folder2"]["id"]]  # folder2 has no liver box

    per_case = tmp_path / "per-case"
    ok(cli(url, token, "prompts", "export-coco", str(dataset_id), str(per_case), "--case", "sm"))
    assert sorted(p.name for p in per_case.iterdir()) == ["sm.coco.json"]


def test_api_errors_are_one_clean_line(live_server, tokens, tmp_path):  # type: ignore[no-untyped-def]
    bad = cli(live_server, "not-a-token", "datasets", "list")
    assert bad.exit_code == 1
    assert "HTTP 401" in bad.stderr and "Traceback" not in bad.stderr + bad.stdout
    assert len(bad.stderr.strip().splitlines()) == 1

    (tmp_path / "bad.json").write_text(json.dumps({"images": "x", "categories": [], "annotations": []}))
    refused = cli(live_server, tokens.researcher, "prompts", "import-coco", "1", str(tmp_path / "bad.json"))
    assert refused.exit_code == 1 and "HTTP 404" in refused.stderr  # no dataset 1 yet

    missing = CliRunner().invoke(commands.app, ["--url", live_server, "datasets", "list"],
                                 env={"CROWDSAM_TOKEN": ""})
    assert missing.exit_code == 1 and "no token" in missing.stderr

    unreachable = cli("http://127.0.0.1:9", tokens.researcher, "datasets", "list")
    assert unreachable.exit_code == 1 and "cannot reach" in unreachable.stderr


def test_real_command_exits_1_without_traceback(live_server):  # type: ignore[no-untyped-def]
    env = {**os.environ, "CROWDSAM_URL": live_server, "CROWDSAM_TOKEN": "wrong"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "client", "datasets", "list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "HTTP 401" in proc.stderr and "Traceback" not in proc.stderr


def test_retry_after_honours_the_server_then_backs_off() -> None:
    import httpx

    assert retry_after(httpx.Response(503, headers={"Retry-After": "7"}), attempt=0) == 7.0
    assert retry_after(httpx.Response(429, headers={"Retry-After": "3600"}), attempt=0) == 60.0  # capped
    assert [retry_after(httpx.Response(503), attempt=a) for a in range(4)] == [1.0, 2.0, 4.0, 8.0]


def _run_with_worker(args: list[str], url: str, token: str, run_jobs: Any,
                     queues: tuple[str, ...] = ("cpu",)) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess while this process drains ``queues`` with a real RQ worker."""
    env = {**os.environ, "CROWDSAM_URL": url, "CROWDSAM_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "client", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            if not run_jobs(*queues):
                time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_dicom_upload_masks_export_evaluate(live_server, tokens, tmp_path, run_jobs):  # type: ignore[no-untyped-def]
    import tarfile

    import nibabel as nib
    import pydicom

    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.segmentations.models import Segmentation
    from tests.dicom_helpers import write_series
    from tests.helpers_exporteval import add_finished_segmentation

    url, token = live_server, tokens.researcher
    dataset_id = int(ok(cli(url, token, "datasets", "create", "cli-jobs", "--labels",
                            json.dumps(ABDOMEN_LABELS))).stdout.strip())
    root = tmp_path / "cases"
    (root / "labels").mkdir(parents=True)
    (root / "sm.nii.gz").symlink_to(CT_DIR / "example_ct_sm.nii.gz")
    (root / "sm_seg.nii.gz").symlink_to(CT_DIR / "example_seg.nii.gz")
    (tmp_path / "map.json").write_text(json.dumps(TOTALSEG_MAP))
    uploaded = json.loads(ok(cli(url, token, "upload", str(dataset_id), str(root), "--reference-map",
                                 f"@{tmp_path / 'map.json'}", "--reference-other", "background")).stdout)
    assert uploaded == {"uploaded": ["sm"], "skipped": [], "failed": []}
    write_series(CT_DIR / "example_ct_sm.nii.gz", tmp_path / "dicom" / "dcm" / "series")  # a nested DICOM folder
    uploaded = json.loads(ok(cli(url, token, "upload", str(dataset_id), str(tmp_path / "dicom"),
                                 "--split", "test")).stdout)
    assert uploaded == {"uploaded": ["dcm"], "skipped": [], "failed": []}
    with Api(url, token) as api:
        volumes = {v["case_id"]: v for v in api.pages(f"/datasets/{dataset_id}/volumes")}
    assert volumes["dcm"]["shape"] == volumes["sm"]["shape"] and not volumes["dcm"]["has_reference"]

    seg_id, _, mask = add_finished_segmentation(volumes["sm"]["id"])
    with session_scope() as session:  # the mask's sha256, as the job sets it
        row = session.get(Segmentation, seg_id)
        assert row is not None and row.mask_key is not None
        row.mask_sha256 = hashlib.sha256(get_storage().read_bytes(row.mask_key)).hexdigest()
        session.commit()
    out = tmp_path / "masks"
    written = json.loads(ok(cli(url, token, "masks", str(dataset_id), str(out), "--figure")).stdout)
    assert written == {"sm": str(out / "sm.nii.gz")}
    assert (np.asarray(nib.load(str(out / "sm.nii.gz")).dataobj) == mask).all()
    assert (out / "sm_figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ok(cli(url, token, "masks", str(dataset_id), str(out), "--format", "dicom-seg"))
    assert pydicom.dcmread(out / "sm.dcm").Modality == "SEG"
    assert not list(out.glob(".*.part"))

    archive = tmp_path / "export.tar.gz"
    done = _run_with_worker(["export", str(dataset_id), "--number", "501", "--out", str(archive)], url, token,
                            run_jobs)
    assert done.returncode == 0, done.stderr
    with tarfile.open(archive) as tar:
        assert any(name.endswith("dataset.json") for name in tar.getnames())

    # An evaluation is queued (running it takes ~40 s here; --wait/--out use the export's code paths).
    queued = json.loads(ok(cli(url, token, "evaluate", str(dataset_id))).stdout)
    assert queued["status"] == "queued" and queued["id"] >= 1
    wrong = cli(url, token, "evaluate", str(dataset_id), "--model", "nope", "--wait")
    assert wrong.exit_code == 1 and "HTTP 422" in wrong.stderr


@pytest.mark.model
def test_segment_wait_with_a_real_worker(live_server, tokens, tmp_path, run_jobs):  # type: ignore[no-untyped-def]
    """``segment --wait`` follows real LiteMedSAM jobs to the end; ``masks`` then finds their masks."""
    import nibabel as nib

    url, token = live_server, tokens.researcher
    dataset_id = int(ok(cli(url, token, "datasets", "create", "cli-sam", "--labels",
                            json.dumps(ABDOMEN_LABELS))).stdout.strip())
    root = tmp_path / "cases"
    root.mkdir()
    (root / "sm.nii.gz").symlink_to(CT_DIR / "example_ct_sm.nii.gz")
    ok(cli(url, token, "upload", str(dataset_id), str(root)))
    with Api(url, token) as api:
        volume = next(iter(api.pages(f"/datasets/{dataset_id}/volumes")))
    w, h = volume["display_size"]
    k = volume["n_slices"] // 2
    coco = {"images": [{"id": 1, "file_name": f"imgsm-slice{k:03d}.png", "width": w, "height": h}],
            "categories": [{"id": 5, "name": "liver"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [w * 0.1, h * 0.2, w * 0.4, h * 0.4]}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    ok(cli(url, token, "prompts", "import-coco", str(dataset_id), str(tmp_path / "boxes.json"), "--annotator", "a"))

    done = _run_with_worker(["segment", str(dataset_id), "--wait"], url, token, run_jobs, ("sam", "cpu"))
    assert done.returncode == 0, done.stderr
    [job] = json.loads(done.stdout).values()
    assert job["status"] == "finished" and job["volume_id"] == volume["id"]
    ok(cli(url, token, "masks", str(dataset_id), str(tmp_path / "masks")))
    mask = np.asarray(nib.load(str(tmp_path / "masks" / "sm.nii.gz")).dataobj)
    assert (mask == ABDOMEN_LABELS["liver"]).sum() > 0
