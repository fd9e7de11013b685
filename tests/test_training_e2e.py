"""Issue 16 end to end through the API: upload → an ``ignore`` export of crowd labels → a tiny CPU nnU-Net
training on the ``train`` queue (progress visible while it runs) → its checkpoint (loaded by nnU-Net's own
predictor) and predictions downloaded → evaluated against the references.

Cases: ``example_ct`` cut into four 13-slice z-blocks over the abdomen, each uploaded with its reference;
block 2 is the test split. The training cases' "crowd" labels are finished segmentations made from their
references with every 4th slice unprompted (``add_finished_segmentation``: no model run), so the export marks
those slices ``ignore`` and ships the ignore-aware fingerprint nnU-Net must plan with. The budget is tiny
(2 epochs × 3 iterations, 16×48×48 patches): this checks the loop, not the model's quality
(bench/study_loop.py prints the numbers). The worker side's cancel and failure paths:
tests/test_training_runner.py.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import CT_DIR
from tests.helpers_exporteval import add_finished_segmentation, upload_case

BLOCKS = [(60, 73), (73, 86), (86, 99), (99, 112)]
TEST_BLOCK = 2
TINY = {"configuration": "3d_fullres", "folds": ["all"], "epochs": 2, "iterations_per_epoch": 3,
        "val_iterations_per_epoch": 1, "patch_size": [16, 48, 48], "batch_size": 2, "device": "cpu", "tta": False}
H = "researcher"


def _blocks(tmp: Path) -> list[tuple[str, str, Path, Path]]:
    image: Any = nib.load(str(CT_DIR / "example_ct.nii.gz"))
    seg: Any = nib.load(str(CT_DIR / "example_seg_fast_force_split.nii.gz"))
    out = []
    for i, (a, b) in enumerate(BLOCKS):
        paths = (tmp / f"blk{i}.nii.gz", tmp / f"blk{i}_seg.nii.gz")
        nib.save(image.slicer[:, :, a:b], str(paths[0]))
        nib.save(seg.slicer[:, :, a:b], str(paths[1]))
        out.append((f"blk{i}", "test" if i == TEST_BLOCK else "train", *paths))
    return out


@pytest.mark.slow
def test_a_training_runs_from_the_api_on_cpu_and_is_evaluated(client, tokens, dataset, run_jobs,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    from app.core.config import get_settings
    from app.core.storage import get_storage

    headers = tokens.headers(H)
    did = dataset["id"]
    volumes = {case: upload_case(client, tokens, did, case, image, ref, split=split)
               for case, split, image, ref in _blocks(tmp_path)}
    test_case = f"blk{TEST_BLOCK}"
    for volume in volumes.values():
        if volume["split"] == "train":
            add_finished_segmentation(volume["id"], keep_every=4)

    made = client.post(f"/api/v1/datasets/{did}/exports", json={
        "dataset_number": 611, "label_source": "segmentation", "model": "litemedsam", "unprompted": "ignore"},
        headers=headers)
    assert made.status_code == 202, made.text
    run_jobs("cpu")
    export = client.get(f"/api/v1/exports/{made.json()['id']}", headers=headers).json()
    assert export["status"] == "finished", export

    posted = client.post(f"/api/v1/datasets/{did}/trainings", json={"export_id": export["id"], **TINY},
                         headers=headers)
    assert posted.status_code == 202, posted.text
    training = posted.json()
    assert training["status"] == "queued" and training["warnings"] == []
    url = f"/api/v1/trainings/{training['id']}"

    # The worker runs here (RQ's signal handlers need the main thread); a thread reads the API meanwhile.
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            row = client.get(url, headers=headers).json()
            if row["status"] == "running":
                seen.append(row["progress"])
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_jobs("train")
    finally:
        done.set()
        watcher.join()
    row = client.get(url, headers=headers).json()
    assert row["status"] == "finished", row["error"]
    phases = {p.get("phase") for p in seen}
    assert {"train", "predict"} <= phases, phases
    in_training = [p for p in seen if p.get("phase") == "train" and p.get("train_loss") is not None]
    assert in_training and all(p["total"] == TINY["epochs"] for p in in_training)
    assert row["progress"]["done"] == row["progress"]["total"] == TINY["epochs"]

    result = row["result"]
    assert [p["case_id"] for p in result["predictions"]] == [test_case]
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for epoch in result["history"]:
        assert set(epoch["pseudo_dice"]) <= set(dataset["labels"]) and epoch["epoch_s"] > 0
    print(f"\ntiny CPU training from the API: phases {result['timings']}")

    # nnU-Net planned with the export's ignore-aware fingerprint, the requested patch and a topology that fits it.
    folder = export["folder"]
    shipped = json.loads(get_storage().read_bytes(f"exports/{export['id']}/{folder}/dataset_fingerprint.json"))
    plans = result["plans"]
    assert result["fingerprint"] == "export"
    key = "foreground_intensity_properties_per_channel"
    assert plans[key] == shipped[key]
    assert plans["patch_size"] == TINY["patch_size"] and plans["batch_size"] == TINY["batch_size"]
    pooled = np.prod(np.array(plans["strides"]), axis=0)
    assert (np.array(plans["patch_size"]) % pooled == 0).all()

    # Artefacts: nnU-Net's model folder, which its own predictor loads, and the predictions it made.
    checkpoint = client.get(f"{url}/checkpoint", headers=headers)
    assert checkpoint.status_code == 200, checkpoint.text
    results_dir = tmp_path / "nnUNet_results"
    with tarfile.open(fileobj=io.BytesIO(checkpoint.content)) as tar:
        names = tar.getnames()
        tar.extractall(results_dir, filter="data")
    model = f"{folder}/nnUNetTrainer__nnUNetPlans__3d_fullres"
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json", "fold_all/checkpoint_final.pth"):
        assert f"{model}/{name}" in names, names
    predictions = client.get(f"{url}/predictions", headers=headers)
    assert predictions.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(predictions.content)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"{test_case}.nii.gz"))
        extracted = tar.extractfile(member)
        assert extracted is not None
        predicted = nib.Nifti1Image.from_bytes(gzip.decompress(extracted.read()))
    assert predicted.shape == tuple(volumes[test_case]["shape"])
    archived = np.asarray(predicted.dataobj)
    n_export_labels = len(export["dataset_json"]["labels"])
    assert set(np.unique(archived).tolist()) <= set(range(n_export_labels))

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results_dir / model), use_folds=("all",))
    test_image = tmp_path / f"{test_case}_0000.nii.gz"
    test_image.write_bytes(get_storage().read_bytes(f"exports/{export['id']}/{folder}/imagesTs/{test_case}_0000.nii.gz"))
    predictor.predict_from_files_sequential([[str(test_image)]], [str(tmp_path / "again")])
    again = np.asarray(nib.load(str(tmp_path / "again.nii.gz")).dataobj)  # type: ignore[attr-defined]
    assert again.shape == archived.shape and (again == archived).mean() > 0.999
    work = get_settings().cache_dir / "trainings"
    assert not work.exists() or not any(work.iterdir())  # the attempt's nnUNet_* folders are gone

    # Its predictions scored against the test case's reference with the service's metrics.
    made = client.post(f"/api/v1/datasets/{did}/evaluations", json={"source": "training", "training": row["id"]},
                       headers=headers)
    assert made.status_code == 202, made.text
    run_jobs("cpu")
    evaluation = client.get(f"/api/v1/evaluations/{made.json()['id']}", headers=headers).json()
    assert evaluation["status"] == "finished", evaluation["error"]
    assert evaluation["result"]["training_id"] == row["id"]
    (case,) = evaluation["result"]["cases"]
    assert case["case_id"] == test_case
    dice = [m["Dice"] for m in case["metrics"].values() if m.get("Dice") is not None]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)
