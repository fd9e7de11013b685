"""Training handler: nnU-Net v2 on an export, in a child process, with progress, cancel and stored artefacts.

Why a child process (:mod:`workers.nnunet_train`): nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` from the environment, and a training is best stopped by killing it. Each attempt gets
its own work directory under ``<cache dir>/trainings/`` (removed afterwards, whatever happened) with the
three nnU-Net folders in it — never a global path.

Steps of one attempt:

1. ``trainings/{id}/`` is deleted (a retry starts over); the export's raw dataset (``dataset.json``,
   ``imagesTr``, ``labelsTr`` and the test images to predict) is downloaded into ``nnUNet_raw``; the export's
   ignore-aware ``dataset_fingerprint.json`` (``ignore`` exports, :mod:`workers.fingerprint`) goes to
   ``$nnUNet_preprocessed/<folder>/`` so nnU-Net plans and normalises with it instead of computing its own.
2. The child plans, preprocesses, trains and predicts, appending JSON lines to a progress file; every ~1 s
   this process reads the new lines and calls ``context.progress(epoch, total epochs, phase=…, …)`` (the
   cancel check: on a cancel, or a job timeout, the child's whole process group gets SIGTERM, then SIGKILL,
   and the exception goes on). A non-zero exit is a :class:`PermanentJobError` with the child's last
   stderr lines.
3. Only after the child succeeded are the artefacts stored: ``model.tar.gz`` (the nnU-Net model folder as
   ``<folder>/<trainer>__nnUNetPlans__<configuration>/``: extract into ``$nnUNet_results`` and run
   ``nnUNetv2_predict``, or load it with ``nnUNetPredictor.initialize_from_trained_model_folder``),
   ``predictions.tar.gz`` (nnU-Net's output folder, export label values) and, per test case,
   ``predictions/{case}.nii.gz``: the prediction in the dataset's label values on the volume's grid (the
   uploaded image's header), which an evaluation scores directly. Any failure removes ``trainings/{id}/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.errors import PermanentJobError
from app.core.storage import Storage, sha256_file
from app.exports.models import Export
from app.imaging.labelmaps import save_label_map
from app.jobs.runner import JobContext, params_model, row_and_dataset
from app.jobs.states import JobStatus
from app.trainings.jobs import TrainingParams
from workers import fingerprint as nnunet_fingerprint
from workers.nnunet import FILE_ENDING, IGNORE

log = logging.getLogger("crowdsam.training")

POLL_S = 1.0
TERM_GRACE_S = 10.0
STDERR_LINES = 40
SKIP_IN_MODEL = ("checkpoint_best.pth", "checkpoint_latest.pth")  # checkpoint_final.pth is the model


def train(context: JobContext) -> dict[str, Any]:
    """Run one nnU-Net training attempt (see the module docstring); returns the row's result columns."""
    params: TrainingParams = params_model(context, TrainingParams)
    storage = context.storage
    started = time.perf_counter()
    with session_scope() as session:
        row_and_dataset(session, context)
        export = session.get(Export, params.export_id)
        if export is None or export.status != JobStatus.finished or not export.result:
            raise LookupError(f"export {params.export_id} is gone or not finished")
        if export.result.get("folder") != params.folder:
            raise ValueError(f"export {params.export_id} holds {export.result.get('folder')!r}, not {params.folder!r}")
        files = [str(f["path"]) for f in export.result["files"]]
    prefix = f"trainings/{context.row_id}"
    storage.delete_prefix(prefix)
    root = get_settings().cache_dir / "trainings"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{context.row_id}-", dir=root))
    try:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        shipped = download_raw(storage, params, files, work)
        timings["download"] = round(time.perf_counter() - t, 3)
        runner = ChildRun(context, params, work)
        summary = runner.run()
        timings.update(summary.get("timings", {}))
        context.progress(runner.total, runner.total, **{**runner.state, "phase": "store"})
        t = time.perf_counter()
        predictions = store_artefacts(storage, params, prefix, work, summary)
        timings["store"] = round(time.perf_counter() - t, 3)
        timings["total"] = round(time.perf_counter() - started, 3)
    except BaseException:
        storage.delete_prefix(prefix)  # a failed or canceled attempt leaves no file behind
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "folder": params.folder,
        "configuration": params.configuration,
        "folds": list(params.folds),
        "trainer": params.trainer,
        "device": summary["device"],
        "fingerprint": "export" if shipped else "nnU-Net",
        "budget": {"epochs": params.epochs, "iterations_per_epoch": params.iterations_per_epoch,
                   "val_iterations_per_epoch": params.val_iterations_per_epoch, "patch_size": params.patch_size,
                   "batch_size": params.batch_size, "gpu_memory_target_gb": params.gpu_memory_target_gb,
                   "tta": params.tta},
        "model_folder": summary["model_folder"],
        "plans": summary["plans"],
        "history": runner.history,
        "timings": timings,
        "versions": summary["versions"],
        "predictions": predictions["cases"],
        "model": predictions["model"],
        "predictions_archive": predictions["archive"],
    }
    return {"result": result, "model_key": f"{prefix}/model.tar.gz", "predictions_key": f"{prefix}/predictions.tar.gz"}


# ------------------------------------------------------------------------------------------------- inputs

def nnunet_dirs(work: Path) -> dict[str, Path]:
    return {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


def download_raw(storage: Storage, params: TrainingParams, files: list[str], work: Path) -> bool:
    """The export's files nnU-Net needs into ``nnUNet_raw``; the shipped fingerprint into ``nnUNet_preprocessed``.

    Returns whether the export shipped a fingerprint. ``files`` are the export's manifest paths
    (``<folder>/imagesTr/…``), stored as ``exports/{export id}/{path}``."""
    dirs = nnunet_dirs(work)
    tests = {case.case_id for case in params.test_cases}
    wanted = [p for p in files if _needed(p, params.folder, tests)]
    if f"{params.folder}/dataset.json" not in wanted:
        raise LookupError(f"export {params.export_id} has no {params.folder}/dataset.json")
    missing = tests - {Path(p).name[:-len(f"_0000{FILE_ENDING}")] for p in wanted if "/imagesTs/" in p}
    if missing:
        raise LookupError(f"export {params.export_id} has no test image for {sorted(missing)}")
    shipped = False
    for path in wanted:
        if path == f"{params.folder}/{nnunet_fingerprint.FILE_NAME}":
            target = dirs["nnUNet_preprocessed"] / path
            shipped = True
        else:
            target = dirs["nnUNet_raw"] / path
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.download(f"exports/{params.export_id}/{path}", target)
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        dirs[name].mkdir(exist_ok=True)
    return shipped


def _needed(path: str, folder: str, tests: set[str]) -> bool:
    parts = path.split("/")
    if parts[0] != folder or len(parts) < 2:
        return False
    if len(parts) == 2:
        return parts[1] in ("dataset.json", nnunet_fingerprint.FILE_NAME)
    if parts[1] in ("imagesTr", "labelsTr"):
        return True
    return parts[1] == "imagesTs" and parts[-1].endswith(f"_0000{FILE_ENDING}") and \
        parts[-1][:-len(f"_0000{FILE_ENDING}")] in tests


# ------------------------------------------------------------------------------------------------- the child

class ChildRun:
    """The nnU-Net child process of one attempt: started, tailed, and killed when the job must stop."""

    def __init__(self, context: JobContext, params: TrainingParams, work: Path) -> None:
        self.context, self.params, self.work = context, params, work
        self.progress_file = work / "progress.jsonl"
        self.summary_file = work / "summary.json"
        self.stderr_file = work / "child.stderr"
        self.history: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {"phase": "start"}
        self.total = max(1, params.epochs * len(params.folds))
        self.done = 0
        self._offset = 0

    def spec(self) -> dict[str, Any]:
        p = self.params
        dataset_json = json.loads((nnunet_dirs(self.work)["nnUNet_raw"] / p.folder / "dataset.json").read_text())
        labels = {k: int(v) for k, v in dataset_json["labels"].items() if k not in ("background", IGNORE)}
        cpus = os.cpu_count() or 1
        return {
            "dataset_number": p.dataset_number, "folder": p.folder, "configuration": p.configuration,
            "folds": list(p.folds), "trainer": p.trainer, "epochs": p.epochs,
            "iterations_per_epoch": p.iterations_per_epoch, "val_iterations_per_epoch": p.val_iterations_per_epoch,
            "patch_size": p.patch_size, "batch_size": p.batch_size, "gpu_memory_target_gb": p.gpu_memory_target_gb,
            "device": p.device, "tta": p.tta, "labels": labels,
            "num_processes": max(1, min(4, cpus // 2)),
            "n_proc_da": None,  # the child decides: nnUNet_n_proc_DA if set, else 0 on CPU, nnU-Net's default on CUDA
            "test_cases": [c.case_id for c in p.test_cases],
            "progress_file": str(self.progress_file), "summary_file": str(self.summary_file),
            "predictions_dir": str(self.work / "predictions"), "parent_pid": os.getpid(),
        }

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") or k in (
            "nnUNet_n_proc_DA", "nnUNet_compile")}
        env.update({k: str(v) for k, v in nnunet_dirs(self.work).items()})
        # nnU-Net's default worker count (validation export, inference threads): at most the cores here
        env["nnUNet_def_n_proc"] = str(max(1, min(8, os.cpu_count() or 1)))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self) -> dict[str, Any]:
        """Start the child, relay its progress until it exits; returns its summary (raises on failure)."""
        spec_path = self.work / "spec.json"
        spec_path.write_text(json.dumps(self.spec(), indent=2))
        with (self.work / "child.stdout").open("wb") as out, self.stderr_file.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers.nnunet_train", str(spec_path)],
                cwd=self.work, env=self.env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a kill reaches its data-loader workers too
            )
            try:
                self._relay(process)
            except BaseException:
                kill_group(process)
                raise
        if process.returncode != 0:
            code = process.returncode
            how = (f"was killed by {signal.Signals(-code).name} (out of memory?)" if code < 0
                   else f"failed (exit {code})")
            raise PermanentJobError(f"nnU-Net {how} during {self.state.get('phase')}: {self.stderr_tail()}")
        if not self.summary_file.is_file():
            raise PermanentJobError("nnU-Net exited without its summary")
        summary: dict[str, Any] = json.loads(self.summary_file.read_text())
        return summary

    def _relay(self, process: subprocess.Popen[bytes]) -> None:
        log.info("nnU-Net child %d started in %s", process.pid, self.work)
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=POLL_S)
            lines = list(self._new_lines())
            for line in lines:
                self._apply(line)
            if lines:
                self.context.progress(min(self.done, self.total), self.total, **self.state)
            else:
                self.context.check_cancel()
            if process.returncode is not None:
                return

    def _new_lines(self) -> Iterator[dict[str, Any]]:
        """Complete lines appended to the progress file since the last call."""
        if not self.progress_file.is_file():
            return
        with self.progress_file.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for raw in chunk[:end].splitlines():
            if raw.strip():
                yield json.loads(raw)

    def _apply(self, line: dict[str, Any]) -> None:
        phase = line.get("phase")
        line.pop("t", None)
        if phase == "start":
            self.state = {"phase": "start", "device": line.get("device")}
        elif phase in ("plan", "preprocess"):
            self.state = {**self._keep(), "phase": phase}
        elif phase == "train":
            self.done = int(line["fold_index"]) * self.params.epochs + int(line["epoch"])
            self.state = {**self._keep(), **{k: v for k, v in line.items() if k != "fold_index"}}
            if int(line["epoch"]) > 0:
                self.history.append({k: v for k, v in line.items() if k not in ("phase", "fold_index")})
        elif phase == "validate":
            self.state = {**self._keep(), "phase": "validate", "fold": line.get("fold")}
        elif phase == "predict":
            self.done = self.total
            self.state = {**self._keep(), "phase": "predict", "cases_done": line["done"],
                          "cases_total": line["total"]}
        elif phase == "done":
            self.state = {**self._keep(), "phase": "predict"}

    def _keep(self) -> dict[str, Any]:
        return {"device": self.state["device"]} if "device" in self.state else {}

    def stderr_tail(self) -> str:
        try:
            with self.stderr_file.open("r", encoding="utf-8", errors="replace") as fh:
                lines = deque(fh, maxlen=STDERR_LINES)
        except OSError:
            return "(no stderr)"
        return "".join(lines).strip()[-4000:] or "(no stderr)"


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it after a grace period, and reap the child."""
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            _kill_rest(process.pid)
            break
        except subprocess.TimeoutExpired:
            continue
    log.warning("nnU-Net child %d stopped (exit %s)", process.pid, process.returncode)


def _kill_rest(pgid: int) -> None:
    """Workers of the group that outlived the child (e.g. ignoring SIGTERM) get SIGKILL."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------- outputs

def store_artefacts(storage: Storage, params: TrainingParams, prefix: str, work: Path,
                    summary: dict[str, Any]) -> dict[str, Any]:
    """Store the model archive, the predictions archive and the dataset-valued prediction of every test case."""
    dirs = nnunet_dirs(work)
    model_folder = dirs["nnUNet_results"] / summary["model_folder"]
    model_archive = work / "model.tar.gz"
    members = model_members(model_folder, dirs["nnUNet_results"])
    write_archive(model_archive, members)
    predictions_dir = work / "predictions"
    predictions_dir.mkdir(exist_ok=True)
    predictions_archive = work / "predictions.tar.gz"
    write_archive(predictions_archive, [(p, f"predictions/{p.relative_to(predictions_dir).as_posix()}")
                                        for p in sorted(predictions_dir.rglob("*")) if p.is_file()])
    dataset_json = json.loads((dirs["nnUNet_raw"] / params.folder / "dataset.json").read_text())
    table = export_to_dataset(dataset_json["labels"], params.label_values_original)
    cases: list[dict[str, Any]] = []
    mapped_dir = work / "mapped"
    mapped_dir.mkdir()
    for case in params.test_cases:
        prediction = predictions_dir / f"{case.case_id}{FILE_ENDING}"
        image = dirs["nnUNet_raw"] / params.folder / "imagesTs" / f"{case.case_id}_0000{FILE_ENDING}"
        target = mapped_dir / f"{case.case_id}{FILE_ENDING}"
        to_dataset_values(prediction, image, table, target)
        cases.append({"case_id": case.case_id, "volume_id": case.volume_id,
                      "key": f"{prefix}/predictions/{case.case_id}{FILE_ENDING}"})
    for case, entry in zip(params.test_cases, cases, strict=True):
        storage.put_file(entry["key"], mapped_dir / f"{case.case_id}{FILE_ENDING}")
    storage.put_file(f"{prefix}/predictions.tar.gz", predictions_archive)
    storage.put_file(f"{prefix}/model.tar.gz", model_archive)
    return {
        "cases": cases,
        "model": {"path": "model.tar.gz", "size": model_archive.stat().st_size, "sha256": sha256_file(model_archive),
                  "files": [name for _, name in members]},
        "archive": {"path": "predictions.tar.gz", "size": predictions_archive.stat().st_size,
                    "sha256": sha256_file(predictions_archive)},
    }


def model_members(model_folder: Path, results: Path) -> list[tuple[Path, str]]:
    """The model folder's files for the archive (paths below ``$nnUNet_results``): plans, dataset.json,
    fingerprint, and per fold the final checkpoint, progress.png, the training log, debug.json and the
    validation summary (numbered folds); not the best/latest checkpoints nor the validation predictions."""
    members = []
    for path in sorted(model_folder.rglob("*")):
        if not path.is_file() or path.name in SKIP_IN_MODEL:
            continue
        relative = path.relative_to(model_folder)
        if "validation" in relative.parts[:-1] and path.name != "summary.json":
            continue
        members.append((path, path.relative_to(results).as_posix()))
    return members


def write_archive(target: Path, members: list[tuple[Path, str]]) -> None:
    """``.tar.gz`` of ``members`` (file, name) in the given order; gzip level 1 (checkpoints barely compress)."""
    with tarfile.open(target, "w:gz", compresslevel=1) as tar:
        for path, name in members:
            tar.add(path, arcname=name, recursive=False)


def export_to_dataset(export_labels: dict[str, Any], label_values_original: dict[str, int]) -> npt.NDArray[np.int32]:
    """Table t with t[export value] = dataset value (background 0); every export label must have its original."""
    values = {name: int(v) for name, v in export_labels.items() if name not in ("background", IGNORE)}
    unknown = sorted(set(values) - set(label_values_original))
    if unknown:
        raise ValueError(f"export labels {unknown} have no dataset value in label_values_original")
    table = np.full(max(values.values(), default=0) + 1, -1, dtype=np.int32)
    table[0] = 0
    for name, value in values.items():
        table[value] = int(label_values_original[name])
    return table


def to_dataset_values(prediction: Path, image: Path, table: npt.NDArray[np.int32], target: Path) -> None:
    """nnU-Net's prediction (export values) → dataset values, written with the test image's header and grid."""
    like: Any = nib.load(str(image))
    loaded: Any = nib.load(str(prediction))
    data = np.asarray(loaded.dataobj).astype(np.int64)
    if tuple(data.shape) != tuple(like.shape[:3]):
        raise ValueError(f"{prediction.name}: nnU-Net's prediction has shape {data.shape}, the image "
                         f"{tuple(like.shape[:3])}")
    if data.size and (data.min() < 0 or data.max() >= table.size or (table[np.unique(data)] < 0).any()):
        raise ValueError(f"{prediction.name}: values {np.unique(data).tolist()[:20]} are not export labels")
    save_label_map(table[data], like, target)
