"""Evaluations over the API: segmentations and uploaded predictions vs references, equal to nnU-Net's own
``compute_metrics_on_folder``; per slice beside per volume Dice; report; paired comparison."""

from __future__ import annotations

import io
import json
import math
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from scipy.stats import wilcoxon

from tests.conftest import ABDOMEN_LABELS, CT_DIR
from tests.helpers_exporteval import add_finished_segmentation, reference_array, upload_case, upload_ct_cases
from tests.test_export import extract_archive, finished_export

H = "researcher"


def post_json(client, tokens, dataset_id, body):  # type: ignore[no-untyped-def]
    return client.post(f"/api/v1/datasets/{dataset_id}/evaluations", json=body, headers=tokens.headers(H))


def post_archive(client, tokens, dataset_id, data: bytes, name="pred.zip", **form):  # type: ignore[no-untyped-def]
    return client.post(f"/api/v1/datasets/{dataset_id}/evaluations", files={"predictions": (name, data)},
                       data=form, headers=tokens.headers(H))


def finished(client, tokens, run_jobs, response) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == 202, response.text
    run_jobs("cpu")
    out = client.get(f"/api/v1/evaluations/{response.json()['id']}", headers=tokens.headers(H)).json()
    assert out["status"] == "finished", out
    return dict(out)


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, arcname=f"nnunet_out/{path.name}")
    return buffer.getvalue()


def tar_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def test_segmentation_evaluation_per_slice_beside_per_volume(client, tokens, dataset, run_jobs):  # type: ignore[no-untyped-def]
    volumes = upload_ct_cases(client, tokens, dataset["id"])
    masks = {case: add_finished_segmentation(v["id"], keep_every=3) for case, v in volumes.items()}
    out = finished(client, tokens, run_jobs, post_json(client, tokens, dataset["id"],
                                                       {"source": "segmentation", "model": "litemedsam"}))
    result = out["result"]
    assert result["labels"] == ABDOMEN_LABELS and result["nsd_tolerance_mm"] == 2.0
    assert "MONAI" in result["surface_library"]
    assert [c["case_id"] for c in result["cases"]] == ["ct", "sm"]
    for case in result["cases"]:
        seg_id, prompted, mask = masks[case["case_id"]]
        assert case["segmentation_id"] == seg_id and case["prompted_slices"] == prompted
        ref, _ = reference_array(case["volume_id"])
        for name, value in ABDOMEN_LABELS.items():
            m = case["metrics"][name]
            r, p = ref == value, mask == value
            expected = 2 * np.count_nonzero(r & p) / (np.count_nonzero(r) + np.count_nonzero(p))
            assert m["Dice"] == pytest.approx(expected, abs=1e-12)
            assert m["Dice"] < 0.95  # a third of the slices were left unprompted and score as background
            # the mask equals the reference on prompted slices: scoring only those gives 1
            assert m["Dice_known_slices"] == 1.0 and m["slice_dice_mean"] == 1.0
            assert 0 < m["NSD"] < 1 and m["HD95"] > 0 and m["HD95_penalized"] is False
            assert m["n_prompted_slices"] == len(case["slice_dice"][name]) > 0
    side = result["side_by_side"]["liver"]
    assert side["slice_dice_mean"] == 1.0 and side["Dice"] < 0.95 and side["Dice_known_slices"] == 1.0
    assert result["hd95"]["penalized"] == 0 and result["hd95"]["n"] == 10
    assert result["hd95"]["per_label"]["liver"] == {"n": 2, "penalized": 0, "penalized_cases": [], "both_empty": 0}
    summary = client.get(f"/api/v1/evaluations/{out['id']}/summary.json", headers=tokens.headers(H)).json()
    assert set(summary) == {"metric_per_case", "mean", "foreground_mean"}
    assert set(summary["mean"]) == {"1", "2", "3", "5", "52"}
    assert summary["mean"]["5"]["Dice"] == pytest.approx(result["mean"]["liver"]["Dice"])
    report = client.get(f"/api/v1/evaluations/{out['id']}/report", headers=tokens.headers(H))
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert report.text.count('src="data:image/png;base64,') >= 3 and "per slice" in report.text
    assert "kidney_left" in report.text and "<table>" in report.text


def test_known_slice_dice_covers_seen_but_empty_slices(client, tokens, dataset, run_jobs, tmp_path,  # type: ignore[no-untyped-def]
                                                       monkeypatch):
    """``Dice_known_slices`` scores the slices an ``ignore`` export keeps: prompted *and* seen without a box.
    Here an annotator saw slices 0 and 3 of example_ct_sm and drew nothing, though organs are there: those
    slices are known background, so the mask's misses there count — as nnU-Net counts them on the export."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from app.imaging.coords import Orientation
    from workers.metrics import overlap

    did = dataset["id"]
    volume = upload_case(client, tokens, did, "sm", CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz")
    seen = client.post(f"/api/v1/volumes/{volume['id']}/prompts", json={"seen": [0, 3]},
                       headers=tokens.headers("annotator"))
    assert seen.status_code == 201, seen.text
    seg_id, prompted, mask = add_finished_segmentation(volume["id"], keep_every=3)  # 0, 3, ... unprompted
    assert 0 not in prompted and 3 not in prompted
    known = sorted([*prompted, 0, 3])
    result = finished(client, tokens, run_jobs, post_json(client, tokens, did, {"source": "segmentation"}))["result"]
    case = result["cases"][0]
    assert case["segmentation_id"] == seg_id and case["prompted_slices"] == prompted
    assert case["known_slices"] == known and case["n_known_slices"] == 22

    ref, image = reference_array(volume["id"])
    orientation = Orientation.from_affine(image.affine, ref.shape)
    in_known = np.zeros(ref.shape[2], dtype=bool)  # RAS sample: canonical k = the file's third axis
    in_known[known] = True
    use = np.broadcast_to(in_known, ref.shape)
    assert np.array_equal(np.asarray(orientation.canonical(use)), use)
    for name, value in ABDOMEN_LABELS.items():
        m = case["metrics"][name]
        expected = overlap(ref == value, mask == value, use)["Dice"]
        assert m["Dice_known_slices"] == pytest.approx(expected, abs=1e-12)
        assert m["Dice_known_slices"] < 1.0  # the seen slices 0 and 3 hold the organ; the mask has none there
        # the prompted slices alone (the old Dice_prompted_slices) would have hidden those misses
        assert overlap(ref == value, mask == value, np.broadcast_to(np.isin(np.arange(30), prompted),
                                                                   ref.shape))["Dice"] == 1.0
        # per-slice Dice stays on the slices where the organ was prompted (seen-only slices are not among them)
        assert m["slice_dice_mean"] == 1.0 and {int(k) for k in case["slice_dice"][name]} <= set(prompted)

    # the ignore export keeps exactly these slices, and nnU-Net's own metric with its ignore label agrees
    export = finished_export(client, tokens, run_jobs, did, label_source="segmentation", unprompted="ignore")
    assert export["dataset_json"]["crowdsam"]["cases"]["sm"]["known_slices"] == known
    folder = extract_archive(client, tokens, export, tmp_path / "export")
    exported = nib.load(str(folder / "labelsTr" / "sm.nii.gz"))
    ignore = np.asarray(exported.dataobj) == 6
    lut = {v: export["dataset_json"]["labels"][n] for n, v in ABDOMEN_LABELS.items()}
    ref_export = np.zeros(ref.shape, dtype=np.uint8)
    pred_export = np.zeros(ref.shape, dtype=np.uint8)
    for value, exported_value in lut.items():
        ref_export[ref == value] = exported_value
        pred_export[mask == value] = exported_value
    ref_export[ignore] = 6
    nib.save(nib.Nifti1Image(ref_export, exported.affine, exported.header), str(tmp_path / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(pred_export, exported.affine, exported.header), str(tmp_path / "pred.nii.gz"))
    nn = compute_metrics(str(tmp_path / "ref.nii.gz"), str(tmp_path / "pred.nii.gz"), SimpleITKIO(),
                         list(lut.values()), ignore_label=6)
    for name, value in ABDOMEN_LABELS.items():
        assert abs(nn["metrics"][lut[value]]["Dice"] - case["metrics"][name]["Dice_known_slices"]) <= 1e-9


def _predictions(labels_dir: Path, out_dir: Path, strength: int) -> None:
    """Damage labelsTr in export values: erode liver ``strength`` times, drop spleen on a few slices."""
    out_dir.mkdir()
    for path in sorted(labels_dir.glob("*.nii.gz")):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj).astype(np.uint8)
        liver = data == 4
        eroded = binary_erosion(liver, iterations=strength)
        data[liver & ~eroded] = 0
        data[:, :, :: 4 + strength][data[:, :, :: 4 + strength] == 1] = 0
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(out_dir / path.name))
    (out_dir / "plans.json").write_text("{}")  # nnU-Net output folders carry these; they are skipped
    (out_dir / "dataset.json").write_text("{}")


def test_uploaded_predictions_equal_nnunet_compute_metrics_on_folder(client, tokens, dataset, run_jobs,  # type: ignore[no-untyped-def]
                                                                     tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    did = dataset["id"]
    upload_ct_cases(client, tokens, did)
    export = finished_export(client, tokens, run_jobs, did, label_source="reference")
    folder = extract_archive(client, tokens, export, tmp_path / "export")
    to_value = {v: ABDOMEN_LABELS[n] for n, v in export["dataset_json"]["labels"].items() if n in ABDOMEN_LABELS}

    evaluations = {}
    for strength in (1, 2):
        pred_dir = tmp_path / f"pred{strength}"
        _predictions(folder / "labelsTr", pred_dir, strength)
        archive = zip_folder(pred_dir) if strength == 1 else tar_folder(pred_dir)
        out = finished(client, tokens, run_jobs, post_archive(
            client, tokens, did, archive, name="p.zip" if strength == 1 else "p.tar.gz",
            label_values=f"export:{export['id']}"))
        assert sorted(out["params"]["skipped_files"]) == sorted(
            ["nnunet_out/dataset.json", "nnunet_out/plans.json"] if strength == 1 else ["dataset.json", "plans.json"])
        nn = compute_metrics_on_folder(str(folder / "labelsTr"), str(pred_dir), None, SimpleITKIO(), ".nii.gz",
                                       [1, 2, 3, 4, 5], num_processes=1)
        ours = {c["case_id"]: c for c in out["result"]["cases"]}
        assert len(nn["metric_per_case"]) == len(ours) == 2
        for row in nn["metric_per_case"]:
            case = ours[Path(row["prediction_file"]).name.removesuffix(".nii.gz")]
            for export_value, metrics in row["metrics"].items():
                name = next(n for n, v in ABDOMEN_LABELS.items() if v == to_value[export_value])
                mine = case["metrics"][name]
                if math.isnan(metrics["Dice"]):
                    assert mine["Dice"] is None
                else:
                    assert abs(mine["Dice"] - metrics["Dice"]) <= 1e-9
                    assert abs(mine["IoU"] - metrics["IoU"]) <= 1e-9
                for key in ("TP", "FP", "FN", "TN", "n_pred", "n_ref"):
                    assert mine[key] == metrics[key], (key, name)
        for export_value, means in nn["mean"].items():
            name = next(n for n, v in ABDOMEN_LABELS.items() if v == to_value[export_value])
            assert abs(out["result"]["mean"][name]["Dice"] - means["Dice"]) <= 1e-9
        assert abs(out["result"]["foreground_mean"]["Dice"] - nn["foreground_mean"]["Dice"]) <= 1e-9
        assert out["result"]["mean"]["liver"]["Dice"] < 1.0
        evaluations[strength] = out

    # paired comparison: milder damage (a) vs stronger (b), on the two cases both have
    a, b = evaluations[1], evaluations[2]
    response = client.post("/api/v1/evaluations/compare", json={"a": a["id"], "b": b["id"], "metric": "dice"},
                           headers=tokens.headers(H))
    assert response.status_code == 200, response.text
    cmp = response.json()
    assert cmp["cases"] == ["ct", "sm"] and cmp["pooled"]["n"] == 10
    liver = cmp["per_label"]["liver"]
    assert liver["n"] == 2 and liver["effect_size_rank_biserial"] == 1.0  # a beats b on every case
    pooled_a = [c["metrics"][n]["Dice"] for c in a["result"]["cases"] for n in ABDOMEN_LABELS]
    pooled_b = [c["metrics"][n]["Dice"] for c in b["result"]["cases"] for n in ABDOMEN_LABELS]
    assert cmp["pooled"]["p_value"] == pytest.approx(wilcoxon(pooled_a, pooled_b).pvalue)
    assert cmp["per_label"]["kidney_left"]["p_value"] == 1.0  # untouched by either: all differences zero


def test_prediction_uploads_are_validated_like_volumes(client, tokens, dataset, run_jobs, tmp_path):  # type: ignore[no-untyped-def]
    from rq import Queue

    from app.core.redis import get_redis

    did = dataset["id"]
    upload_case(client, tokens, did, "sm", CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz")
    upload_case(client, tokens, did, "noref", CT_DIR / "example_ct_sm.nii.gz", None)
    ref, img = reference_array(1)

    def archive_of(**files: nib.Nifti1Image | bytes) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for name, content in files.items():
                if isinstance(content, bytes):
                    zf.writestr(name, content)
                else:
                    path = tmp_path / "f.nii.gz"
                    nib.save(content, str(path))
                    zf.write(path, arcname=name)
        return buffer.getvalue()

    good = nib.Nifti1Image(ref.astype(np.uint8), img.affine, img.header)
    shifted = img.affine.copy()
    shifted[:3, 3] += 246.0
    bad_values = ref.astype(np.uint8).copy()
    bad_values[0, 0, 0] = 7
    cases = [
        (b"not an archive", {}, "not a zip or tar"),
        (archive_of(**{"readme.txt": b"x"}), {}, "no {CASE}.nii.gz"),
        (archive_of(**{"other.nii.gz": good}), {}, "not in dataset"),
        (archive_of(**{"noref.nii.gz": good}), {}, "without a reference"),
        (archive_of(**{"sm.nii.gz": b"garbage"}), {}, "prediction sm"),
        (archive_of(**{"sm.nii.gz": nib.Nifti1Image(ref[:, :, :10].astype(np.uint8), img.affine)}), {}, "shape"),
        (archive_of(**{"sm.nii.gz": nib.Nifti1Image(ref.astype(np.uint8), shifted)}), {}, "affine differs"),
        (archive_of(**{"sm.nii.gz": nib.Nifti1Image(bad_values, img.affine, img.header)}), {}, "values [7]"),
        (archive_of(**{"sm.nii.gz": good}), {"label_values": "export:99"}, "export 99 does not exist"),
        (archive_of(**{"sm.nii.gz": good}), {"label_values": "nnunet"}, "label_values 'nnunet'"),
        (archive_of(**{"sm.nii.gz": good}), {"nsd_tolerance_mm": "-1"}, "nsd_tolerance_mm"),
    ]
    for data, form, message in cases:
        response = post_archive(client, tokens, did, data, **form)
        assert response.status_code == 422, (message, response.text)
        assert message in json.dumps(response.json()["detail"]), (message, response.json())
    for body, message in [
        ({"source": "segmentation", "model": "nope"}, "unknown model 'nope'"),
        ({"source": "segmentation", "model": "litemedsam"}, "finished 'litemedsam' segmentation"),
        ({"source": "elsewhere"}, "source"),
    ]:
        response = post_json(client, tokens, did, body)
        assert response.status_code == 422 and message in json.dumps(response.json()["detail"]), response.text
    assert Queue("cpu", connection=get_redis()).count == 0
    # a path in the archive is ignored (base name only): no traversal, and the evaluation works
    traversal = archive_of(**{"../../x/sm.nii.gz": good})
    out = finished(client, tokens, run_jobs, post_archive(client, tokens, did, traversal))
    assert out["result"]["foreground_mean"]["Dice"] == 1.0 and out["result"]["missing_cases"] == []
    assert client.get(f"/api/v1/evaluations/{out['id']}", headers=tokens.headers("annotator")).status_code == 403


def test_compare_and_results_need_finished_evaluations_of_one_dataset(client, tokens, dataset, run_jobs):  # type: ignore[no-untyped-def]
    volume = upload_case(client, tokens, dataset["id"], "sm", CT_DIR / "example_ct_sm.nii.gz",
                         CT_DIR / "example_seg.nii.gz")
    add_finished_segmentation(volume["id"])
    first = post_json(client, tokens, dataset["id"], {"source": "segmentation"}).json()
    for path in (f"/api/v1/evaluations/{first['id']}/summary.json", f"/api/v1/evaluations/{first['id']}/report"):
        assert client.get(path, headers=tokens.headers(H)).status_code == 409
    body = {"a": first["id"], "b": first["id"], "metric": "dice"}
    assert client.post("/api/v1/evaluations/compare", json=body, headers=tokens.headers(H)).status_code == 409
    run_jobs("cpu")
    other = client.post("/api/v1/datasets", json={"name": "other", "labels": ABDOMEN_LABELS},
                        headers=tokens.headers(H)).json()
    v2 = upload_case(client, tokens, other["id"], "sm", CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz")
    add_finished_segmentation(v2["id"])
    second = finished(client, tokens, run_jobs, post_json(client, tokens, other["id"], {"source": "segmentation"}))
    body = {"a": first["id"], "b": second["id"], "metric": "nsd"}
    response = client.post("/api/v1/evaluations/compare", json=body, headers=tokens.headers(H))
    assert response.status_code == 422 and "different datasets" in response.text
    body = {"a": first["id"], "b": first["id"], "metric": "nsd"}
    same = client.post("/api/v1/evaluations/compare", json=body, headers=tokens.headers(H)).json()
    assert same["pooled"]["n"] == 5 and same["pooled"]["p_value"] == 1.0
    assert client.post("/api/v1/evaluations/compare", json={**body, "metric": "volume"},
                       headers=tokens.headers(H)).status_code == 422
