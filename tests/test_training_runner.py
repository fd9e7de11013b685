"""The training job's worker side (issue 16): a real, tiny nnU-Net v2 training on CPU — no mocks.

The data: ``example_ct`` cut into four 13-slice z-blocks over the abdomen, each a case with its
TotalSegmentator reference reduced to spleen (1) and liver (5); three train cases, block 2 held out as the
test case. The export is an ``ignore`` export (every 4th slice of the train cases unknown), written by the
export's own writer, so it ships the ignore-aware ``dataset_fingerprint.json``, and its label values are
not the dataset's (liver: export 2, dataset 5). The job runs through :func:`app.jobs.runner.run_job`
exactly as a worker runs it. The successful path (progress, the fingerprint nnU-Net planned with, artefacts,
the checkpoint loading in nnU-Net's own predictor, evaluation) runs through the API in
tests/test_training_e2e.py; here: the cancel and failure paths and the value mapping.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import CT_DIR

FOLDER = "Dataset501_Tiny"
BLOCKS = [(60, 73), (73, 86), (86, 99), (99, 112)]
TEST_BLOCK = 2
LABELS = {"spleen": 1, "liver": 5}
TINY = {"configuration": "3d_fullres", "folds": ["all"], "trainer": "nnUNetTrainer", "epochs": 2,
        "iterations_per_epoch": 3, "val_iterations_per_epoch": 1, "patch_size": [16, 48, 48], "batch_size": 2,
        "gpu_memory_target_gb": None, "device": "cpu", "tta": False}


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ``ignore`` export's folder, written once per module by the export's writer."""
    from workers.nnunet import CaseInput, write_dataset

    root = tmp_path_factory.mktemp("tiny")
    image: Any = nib.load(str(CT_DIR / "example_ct.nii.gz"))
    seg = np.asarray(load(str(CT_DIR / "example_seg_fast_force_split.nii.gz")).dataobj)
    cases = []
    for i, (a, b) in enumerate(BLOCKS):
        path = root / f"block{i}.nii.gz"
        nib.save(image.slicer[:, :, a:b], str(path))
        labels = seg[:, :, a:b].astype(np.int32)
        labels[~np.isin(labels, list(LABELS.values()))] = 0
        split = "test" if i == TEST_BLOCK else "train"
        known = [k for k in range(b - a) if k % 4] if split == "train" else None
        cases.append(CaseInput(f"blk{i}", split, path, labels, known, {"volume_id": 100 + i}))
    return write_dataset(root / "raw", number=501, name="Tiny", dataset_labels=LABELS, cases=cases,
                         unprompted="ignore")


def load(path: str) -> Any:
    """nibabel's image (typed loosely: its stubs know no ``dataobj``)."""
    return nib.load(path)


def make_training(folder: Path, **overrides: Any) -> int:
    """A dataset, a finished export whose files are in the store (as the export job leaves them) and a queued
    training row on it; returns the training's id."""
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.datasets.models import Dataset
    from app.exports.models import Export
    from app.trainings.models import Training
    from workers.nnunet import manifest

    files = manifest(folder)
    with session_scope() as session:
        dataset = Dataset(name="tiny", labels=LABELS, window_level=40, window_width=400)
        session.add(dataset)
        session.flush()
        export = Export(dataset_id=dataset.id, format="nnunet-v2", params={}, status="finished", created_by="test",
                        result={"folder": folder.name, "files": files})
        session.add(export)
        session.flush()
        for row in files:
            get_storage().put_file(f"exports/{export.id}/{row['path']}", folder.parent / row["path"])
        params = {**TINY, "export_id": export.id, "dataset_number": 501, "folder": folder.name,
                  "test_cases": [{"case_id": f"blk{TEST_BLOCK}", "volume_id": 100 + TEST_BLOCK}],
                  "label_values_original": LABELS, "label_source": "segmentation", "unprompted": "ignore",
                  **overrides}
        training = Training(dataset_id=dataset.id, export_id=export.id, params=params, created_by="test")
        session.add(training)
        session.commit()
        return int(training.id)


def training_row(training_id: int) -> Any:
    from app.core.db import session_scope
    from app.trainings.models import Training

    with session_scope() as session:
        row = session.get(Training, training_id)
        session.expunge(row)
        return row


def stored(prefix: str) -> list[str]:
    from app.core.storage import get_storage

    storage = get_storage()
    return sorted(p[len(storage.root) + 1:] for p in storage.fs.find(f"{storage.root}/{prefix}"))


def work_dirs() -> list[Path]:
    """What attempts left in the trainings' work root (each attempt removes its own directory)."""
    from app.core.config import get_settings

    root = get_settings().cache_dir / "trainings"
    return list(root.iterdir()) if root.exists() else []


def nnunet_children() -> list[int]:
    """Pids of live ``workers.nnunet_train`` processes started from this test session's work dirs."""
    from app.core.config import get_settings

    marker = str(get_settings().cache_dir / "trainings").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if b"workers.nnunet_train" in cmdline and marker in cmdline and state not in ("Z", "X"):
            pids.append(int(proc.name))
    return pids


class ProgressWatcher(threading.Thread):
    """Reads the row's progress every 0.2 s while the job runs (what a client polling the API sees)."""

    def __init__(self, training_id: int, on_progress: Any = None) -> None:
        super().__init__(daemon=True)
        self.training_id, self.on_progress = training_id, on_progress
        self.seen: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            progress = dict(training_row(self.training_id).progress or {})
            if progress and (not self.seen or progress != self.seen[-1]):
                self.seen.append(progress)
                if self.on_progress is not None:
                    self.on_progress(progress)


def test_export_values_map_back_to_dataset_values(tmp_path: Path) -> None:
    from workers.training import _needed, export_to_dataset, to_dataset_values

    table = export_to_dataset({"background": 0, "spleen": 1, "liver": 2, "ignore": 3}, LABELS)
    assert table.tolist() == [0, 1, 5]
    with pytest.raises(ValueError, match="liver"):
        export_to_dataset({"background": 0, "spleen": 1, "liver": 2}, {"spleen": 1})
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    nib.save(image, str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), 2, np.uint8), image.affine), str(tmp_path / "pred.nii.gz"))
    to_dataset_values(tmp_path / "pred.nii.gz", tmp_path / "img.nii.gz", table, tmp_path / "out.nii.gz")
    assert np.unique(np.asarray(load(str(tmp_path / "out.nii.gz")).dataobj)).tolist() == [5]
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), 3, np.uint8), image.affine), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(ValueError, match="not export labels"):  # ignore (3) is never a prediction
        to_dataset_values(tmp_path / "bad.nii.gz", tmp_path / "img.nii.gz", table, tmp_path / "out2.nii.gz")
    tests = {"blk2"}
    assert _needed(f"{FOLDER}/imagesTr/blk0_0000.nii.gz", FOLDER, tests)
    assert _needed(f"{FOLDER}/imagesTs/blk2_0000.nii.gz", FOLDER, tests)
    assert not _needed(f"{FOLDER}/imagesTs/blk9_0000.nii.gz", FOLDER, tests)
    assert not _needed(f"{FOLDER}/labelsTs/blk2.nii.gz", FOLDER, tests)
    assert _needed(f"{FOLDER}/dataset_fingerprint.json", FOLDER, tests)


@pytest.mark.slow
def test_cancel_mid_training_kills_the_child_and_leaves_no_file(raw_dataset: Path) -> None:
    from app.core.redis import get_redis
    from app.jobs.kinds import get_kind
    from app.jobs.runner import run_job
    from workers.training import train

    training_id = make_training(raw_dataset, epochs=200)
    kind = get_kind("training")
    children: list[int] = []

    def cancel_once_training(progress: dict[str, Any]) -> None:
        if progress.get("phase") == "train" and not children:
            children.extend(nnunet_children())
            get_redis().set(kind.cancel_key(training_id), 1)

    watcher = ProgressWatcher(training_id, cancel_once_training)
    watcher.start()
    started = time.perf_counter()
    try:
        outcome = run_job("training", training_id, train)
    finally:
        watcher.stop.set()
        watcher.join()
    print(f"\ncancel: job stopped {time.perf_counter() - started:.1f} s after its start")
    row = training_row(training_id)
    assert outcome["status"] == "canceled" and row.status == "canceled"
    assert children, "the child was not running when the cancel was requested"
    assert nnunet_children() == []
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    assert stored(f"trainings/{training_id}") == []
    assert work_dirs() == []


@pytest.mark.slow
def test_nnunet_failure_fails_the_job_with_its_stderr(raw_dataset: Path) -> None:
    from app.core.errors import PermanentJobError
    from app.jobs.runner import run_job
    from workers.training import train

    training_id = make_training(raw_dataset, configuration="3d_lowres", patch_size=None, batch_size=None)
    with pytest.raises(PermanentJobError):
        run_job("training", training_id, train)
    row = training_row(training_id)
    assert row.status == "failed"
    assert "3d_lowres" in row.error and "during plan" in row.error, row.error
    assert stored(f"trainings/{training_id}") == []
    assert work_dirs() == []
