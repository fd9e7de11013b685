"""One nnU-Net v2 training run in its own interpreter: ``python -m workers.nnunet_train <spec.json>``.

Started by :mod:`workers.training` (the RQ job) with ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` pointing into the job's work directory; the raw dataset (and, for ``ignore`` exports,
the export's ignore-aware ``dataset_fingerprint.json`` in ``$nnUNet_preprocessed/<folder>/``) is already
there. Steps, each announced as one JSON line in ``spec["progress_file"]`` (the parent tails it):

1. ``plan``: fingerprint (nnU-Net skips extraction when the export's file is present), then nnU-Net's
   ``ExperimentPlanner`` with the job's GPU memory target; ``patch_size`` (nnU-Net's axis order, as in the
   plans) re-derives the network topology with nnU-Net's own ``get_pool_and_conv_props`` so every pooling
   fits; ``batch_size`` replaces the planned one. Plans name stays ``nnUNetPlans``.
2. ``preprocess``: the requested configuration only, with few processes.
3. ``train``: each fold with the requested trainer class under its own name (so the checkpoint's
   ``trainer_name`` is one nnU-Net knows and ``nnUNetPredictor``/``nnUNetv2_predict`` load the model
   unchanged), its budget replaced: epochs, iterations per epoch, validation iterations. One line per epoch:
   train/val loss, pseudo-Dice per label, its EMA, the epoch's seconds. Numbered folds are validated
   (nnU-Net's ``perform_actual_validation``); fold ``all`` has no held-out cases.
4. ``predict``: the test cases from ``imagesTs`` with ``nnUNetPredictor`` (folds used, ``use_mirroring`` =
   TTA), one line per case; outputs are nnU-Net's files in the export's label values.

At the end ``spec["summary_file"]`` gets the run's timings, plans summary, history and versions.
Errors go to stderr and the exit status is non-zero; the parent turns that into a failed job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from copy import deepcopy
from pathlib import Path
from typing import Any

PLANS = "nnUNetPlans"
DIMS = {"2d": 2, "3d_fullres": 3, "3d_lowres": 3}
N_PROC_DA, RESULTS = "nnUNet_n_proc_DA", "nnUNet_results"  # nnU-Net's (lower-case) environment variables
INHERITED_N_PROC_DA = os.environ.get(N_PROC_DA)  # the worker's setting (this module then overrides it)


class Progress:
    """Appends one JSON object per line and flushes it (the parent reads complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **fields: Any) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"t": round(time.time(), 3), **fields}, default=float) + "\n")
            fh.flush()


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples as JSON types."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def plan(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Fingerprint (unless shipped), plans with the job's overrides; returns the plans dict."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    from nnunetv2.paths import nnUNet_preprocessed

    number, folder, configuration = spec["dataset_number"], spec["folder"], spec["configuration"]
    fingerprint = Path(str(nnUNet_preprocessed)) / folder / "dataset_fingerprint.json"
    shipped = fingerprint.is_file()
    progress.write(phase="plan", step="fingerprint", fingerprint="export" if shipped else "nnU-Net")
    # clean=False: an existing (the export's ignore-aware) fingerprint is used as it is
    extract_fingerprint_dataset(number, num_processes=spec["num_processes"], check_dataset_integrity=True,
                                clean=False, verbose=False, show_progress_bar=False)
    patch_size = spec.get("patch_size")
    if patch_size is not None and len(patch_size) != DIMS[configuration]:
        raise ValueError(f"patch_size {patch_size} has {len(patch_size)} axes; {configuration} needs "
                         f"{DIMS[configuration]}")

    class Planner(ExperimentPlanner):
        """nnU-Net's planner; the requested configuration gets the given patch size (with its own topology)
        and batch size."""

        def get_plans_for_configuration(self, spacing: Any, median_shape: Any, data_identifier: str,
                                        approximate_n_voxels_dataset: float, _cache: dict[str, Any]) -> Any:
            out = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                      approximate_n_voxels_dataset, _cache)
            if data_identifier != self.generate_data_identifier(configuration):
                return out  # the overrides are for the requested configuration only
            if patch_size is not None:
                _apply_patch_size(self, out, spacing, patch_size)
            if spec.get("batch_size") is not None:
                out["batch_size"] = int(spec["batch_size"])
            return out

    planner = Planner(number, gpu_memory_target_in_gb=float(spec.get("gpu_memory_target_gb") or 8),
                      plans_name=PLANS)
    plans: dict[str, Any] = planner.plan_experiment()
    if configuration not in plans["configurations"]:
        raise ValueError(f"nnU-Net planned no {configuration!r} configuration for this dataset (it has "
                         f"{sorted(plans['configurations'])}); 3d_lowres exists only for large images")
    if shipped:
        ours = json.loads(fingerprint.read_text())["foreground_intensity_properties_per_channel"]
        if _plain(plans["foreground_intensity_properties_per_channel"]) != _plain(ours):
            raise AssertionError("the plans do not use the export's fingerprint")
    return plans


def _apply_patch_size(planner: Any, plan_: dict[str, Any], spacing: Any, patch_size: list[int]) -> None:
    """Replace a configuration's patch size and re-derive its UNet topology (as the planner derives it)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pool_op_kernel_sizes, conv_kernel_sizes, patch, _ = get_pool_and_conv_props(
        spacing, patch_size, planner.UNet_featuremap_min_edge_length, 999999)
    n_stages = len(pool_op_kernel_sizes)
    max_features = planner.UNet_max_features_2d if len(spacing) == 2 else planner.UNet_max_features_3d
    plan_["patch_size"] = tuple(int(p) for p in patch)
    plan_["architecture"]["arch_kwargs"].update({
        "n_stages": n_stages,
        "features_per_stage": tuple(min(max_features, planner.UNet_base_num_features * 2 ** i)
                                    for i in range(n_stages)),
        "kernel_sizes": conv_kernel_sizes,
        "strides": pool_op_kernel_sizes,
        "n_conv_per_stage": planner.UNet_blocks_per_stage_encoder[:n_stages],
        "n_conv_per_stage_decoder": planner.UNet_blocks_per_stage_decoder[:n_stages - 1],
    })


def preprocess(spec: dict[str, Any]) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    preprocess_dataset(spec["dataset_number"], PLANS, (spec["configuration"],), [spec["num_processes"]],
                       verbose=False, show_progress_bar=False)


def trainer_class(spec: dict[str, Any], progress: Progress, fold_index: int) -> Any:
    """The requested nnU-Net trainer with the job's budget and a progress line per epoch, under the base name."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    base = recursive_find_trainer_class_by_name(spec["trainer"])
    if base is None:
        raise ValueError(f"nnU-Net has no trainer class {spec['trainer']!r}")
    epochs = int(spec["epochs"])
    label_names = {int(v): k for k, v in spec["labels"].items()}

    def __init__(self: Any, plans: dict[str, Any], configuration: str, fold: int | str, dataset_json: dict[str, Any],
                 device: torch.device = torch.device("cuda")) -> None:
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if spec.get("iterations_per_epoch") is not None:
            self.num_iterations_per_epoch = int(spec["iterations_per_epoch"])
        if spec.get("val_iterations_per_epoch") is not None:
            self.num_val_iterations_per_epoch = int(spec["val_iterations_per_epoch"])

    def on_epoch_end(self: Any) -> None:
        base.on_epoch_end(self)
        log = self.logger
        dice = [float(d) for d in log.get_value("dice_per_class_or_region", step=-1)]
        labels = [label_names.get(int(v), str(v)) for v in self.label_manager.foreground_labels]
        progress.write(
            phase="train", fold=str(self.fold), fold_index=fold_index, epoch=int(self.current_epoch), epochs=epochs,
            train_loss=float(log.get_value("train_losses", step=-1)),
            val_loss=float(log.get_value("val_losses", step=-1)),
            pseudo_dice=dict(zip(labels, dice, strict=False)),
            ema=float(log.get_value("ema_fg_dice", step=-1)),
            lr=float(log.get_value("lrs", step=-1)),
            epoch_s=round(float(log.get_value("epoch_end_timestamps", step=-1)
                                - log.get_value("epoch_start_timestamps", step=-1)), 3),
        )

    return type(base.__name__, (base,), {"__init__": __init__, "on_epoch_end": on_epoch_end,
                                          "__module__": base.__module__, "__qualname__": base.__qualname__})


def train(spec: dict[str, Any], progress: Progress, device: Any) -> Path:
    """Train every fold; returns the model folder (``$nnUNet_results/<folder>/<trainer>__nnUNetPlans__<cfg>``)."""
    from nnunetv2.paths import nnUNet_preprocessed

    base = Path(str(nnUNet_preprocessed)) / spec["folder"]
    # data augmentation workers per trainer (0 = in this process); nnU-Net reads it when it builds the loaders
    os.environ[N_PROC_DA] = str(n_proc_da(spec, device))
    model_folder = None
    for i, fold in enumerate(spec["folds"]):
        plans = json.loads((base / f"{PLANS}.json").read_text())
        plans["continue_training"] = False
        dataset_json = json.loads((base / "dataset.json").read_text())
        cls = trainer_class(spec, progress, i)
        trainer = cls(plans=plans, configuration=spec["configuration"], fold=fold, dataset_json=dataset_json,
                      device=device)
        progress.write(phase="train", fold=str(fold), fold_index=i, epoch=0, epochs=int(spec["epochs"]))
        trainer.run_training()
        if fold != "all":
            progress.write(phase="validate", fold=str(fold), fold_index=i)
            trainer.perform_actual_validation(False)
        model_folder = Path(trainer.output_folder_base)
        del trainer
    assert model_folder is not None
    return model_folder


def predict(spec: dict[str, Any], progress: Progress, device: Any, model_folder: Path) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw

    cases = spec["test_cases"]
    out = Path(spec["predictions_dir"])
    out.mkdir(parents=True, exist_ok=True)
    progress.write(phase="predict", done=0, total=len(cases))
    if not cases:
        return
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(spec["tta"]),
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=tuple(spec["folds"]),
                                                   checkpoint_name="checkpoint_final.pth")
    images = Path(str(nnUNet_raw)) / spec["folder"] / "imagesTs"
    for i, case in enumerate(cases):
        image = images / f"{case}_0000.nii.gz"
        if not image.is_file():
            raise LookupError(f"test case {case!r} has no image in the export ({image.name})")
        with torch.no_grad():
            predictor.predict_from_files_sequential([[str(image)]], [str(out / case)], save_probabilities=False,
                                                    overwrite=True)
        progress.write(phase="predict", done=i + 1, total=len(cases), case=case)


def plans_summary(plans: dict[str, Any], configuration: str) -> dict[str, Any]:
    cfg = plans["configurations"][configuration]
    arch = cfg["architecture"]["arch_kwargs"]
    return _plain({
        "configuration": configuration,
        "patch_size": cfg["patch_size"],
        "batch_size": cfg["batch_size"],
        "spacing": cfg["spacing"],
        "median_image_size_in_voxels": cfg["median_image_size_in_voxels"],
        "normalization_schemes": cfg["normalization_schemes"],
        "n_stages": arch["n_stages"],
        "strides": arch["strides"],
        "features_per_stage": arch["features_per_stage"],
        "transpose_forward": plans["transpose_forward"],
        "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
        "configurations_planned": sorted(plans["configurations"]),
    })


def n_proc_da(spec: dict[str, Any], device: Any) -> int:
    """Data-augmentation processes: the spec's, else the worker's ``nnUNet_n_proc_DA``, else 0 on CPU (no worker
    processes: the CPU is busy training) and nnU-Net's own default on CUDA."""
    if spec.get("n_proc_da") is not None:
        return int(spec["n_proc_da"])
    if INHERITED_N_PROC_DA is not None:
        return int(INHERITED_N_PROC_DA)
    if device.type == "cpu":
        return 0
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    return int(get_allowed_n_proc_DA())


def watch_parent(parent_pid: int | None) -> None:
    """End this process group when the worker that started it dies (a SIGKILLed worker cannot kill us)."""
    if not parent_pid:
        return

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent_pid:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but this worker has no usable CUDA device")
    return torch.device(name)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    progress = Progress(Path(spec["progress_file"]))
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        return now

    from importlib.metadata import version

    import torch

    from app.core.runtime import use_spawn

    use_spawn()  # nnU-Net's worker processes start fresh interpreters (this process has a watchdog thread)
    watch_parent(spec.get("parent_pid"))
    device = resolve_device(spec["device"])
    # nnU-Net's planner sets torch's thread count from this while it sizes networks: never 0 there
    os.environ[N_PROC_DA] = str(max(1, n_proc_da(spec, device)))
    if device.type == "cpu" and spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    versions = {"nnunetv2": version("nnunetv2"), "torch": torch.__version__, "python": sys.version.split()[0],
                "cuda": torch.version.cuda if device.type == "cuda" else None}
    progress.write(phase="start", device=str(device), versions=versions)
    t = lap("start", started)
    plans = plan(spec, progress)
    t = lap("plan", t)
    progress.write(phase="preprocess")
    preprocess(spec)
    t = lap("preprocess", t)
    model_folder = train(spec, progress, device)
    t = lap("train", t)
    predict(spec, progress, device, model_folder)
    lap("predict", t)
    timings["total"] = round(time.perf_counter() - started, 3)
    summary = {
        "device": str(device),
        "model_folder": model_folder.relative_to(Path(os.environ[RESULTS])).as_posix(),
        "plans": plans_summary(deepcopy(plans), spec["configuration"]),
        "timings": timings,
        "versions": versions,
    }
    Path(spec["summary_file"]).write_text(json.dumps(summary, indent=2))
    progress.write(phase="done", timings=timings)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m workers.nnunet_train <spec.json>", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(main(sys.argv[1]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
