"""Segmentation metrics and paired statistics, with nnU-Net v2's conventions.

Overlap metrics follow ``nnunetv2.evaluation.evaluate_predictions.compute_metrics``: per label TP, FP,
FN, TN, n_pred = TP + FP, n_ref = TP + FN, Dice = 2TP / (2TP + FP + FN) and IoU = TP / (TP + FP + FN),
both NaN when TP + FP + FN == 0; class means use ``nanmean`` over cases and ``foreground_mean`` is the
plain mean of the class means (as nnU-Net computes it).

Surface metrics use MONAI (``monai.metrics.compute_surface_dice`` for NSD at a tolerance in mm and
``compute_hausdorff_distance(percentile=95)`` for HD95), with the voxel spacing of the original grid.
MONAI (and so torch) is imported lazily.

Empty masks (DESIGN.md section 9, "Metrics"):

- reference and prediction both empty: every metric is NaN and left out of the means — nnU-Net's
  convention for Dice/IoU (``compute_metrics``: NaN when TP + FP + FN == 0, class means by ``nanmean``),
  applied to NSD and HD95 alike: there is nothing to find and nothing was found;
- exactly one empty (a missed or a hallucinated organ): Dice = IoU = 0 (nnU-Net), NSD = 0 (no surface
  within the tolerance) and HD95 — undefined, as there is no surface to measure to — gets a penalty,
  the diagonal of the image's field of view, √Σ(nᵢ·sᵢ)² mm (:func:`hd95_penalty`): larger than any HD95
  measurable in that image, so a miss always scores worse than the worst real contour. Such a value is
  flagged ``HD95_penalized`` and counted by :func:`summarize`; it is never dropped (before, HD95 was NaN
  there and the nanmean left the miss out, so a missed organ made the mean HD95 look better).

The paired statistics and ``json_safe`` live in ``app.evaluations.statistics`` (the API uses them too).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from app.imaging.metrics import dice  # the one Dice (nnU-Net: NaN when both are empty); re-exported here

OVERLAP_KEYS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")
SURFACE_LIBRARY = "MONAI compute_surface_dice (NSD) and compute_hausdorff_distance(percentile=95) (HD95)"
PENALIZED = "HD95_penalized"  # per case and label: True when HD95 is the penalty (not averaged, counted)
HD95_PENALTY_RULE = (
    "reference or prediction empty (not both): HD95 = the image's field-of-view diagonal sqrt(sum((n_i*s_i)^2)) "
    "mm, counted as penalized and kept in the means; both empty: NaN, left out (nnU-Net's convention)"
)

BoolArray = npt.NDArray[np.bool_]


def overlap(ref: BoolArray, pred: BoolArray, use: BoolArray | None = None) -> dict[str, float]:
    """nnU-Net's ``compute_tp_fp_fn_tn`` + Dice/IoU for one label; ``use`` restricts the voxels counted."""
    if use is None:
        tp = int(np.count_nonzero(ref & pred))
        fp = int(np.count_nonzero(~ref & pred))
        fn = int(np.count_nonzero(ref & ~pred))
        tn = int(ref.size - tp - fp - fn)
    else:
        tp = int(np.count_nonzero(ref & pred & use))
        fp = int(np.count_nonzero(~ref & pred & use))
        fn = int(np.count_nonzero(ref & ~pred & use))
        tn = int(np.count_nonzero(use)) - tp - fp - fn
    if tp + fp + fn == 0:
        dice = iou = math.nan
    else:
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
    return {"Dice": dice, "IoU": iou, "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}


def hd95_penalty(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """HD95 of a missed or hallucinated organ: the field-of-view diagonal √Σ(nᵢ·sᵢ)² in mm, an upper bound
    of every distance between two voxels of the image."""
    return float(math.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def surface(ref: BoolArray, pred: BoolArray, spacing: Sequence[float], tolerance_mm: float) -> dict[str, Any]:
    """NSD at ``tolerance_mm`` and HD95 in mm (MONAI), on the bounding box of both masks plus a margin.

    Both empty: NaN, NaN. Exactly one empty: NSD 0 and HD95 = :func:`hd95_penalty` with
    ``HD95_penalized`` True (the module's docstring)."""
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not has_ref and not has_pred:
        return {"NSD": math.nan, "HD95": math.nan, PENALIZED: False}
    if not has_ref or not has_pred:
        return {"NSD": 0.0, "HD95": hd95_penalty(ref.shape, spacing), PENALIZED: True}
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    ref_c, pred_c = _crop_pair(ref, pred, margin=2)
    y = torch.from_numpy(ref_c[None, None].astype(np.float32))
    y_pred = torch.from_numpy(pred_c[None, None].astype(np.float32))
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        nsd = compute_surface_dice(y_pred, y, [float(tolerance_mm)], include_background=True, spacing=sp)
        hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=sp)
    return {"NSD": float(nsd.item()), "HD95": float(hd.item()), PENALIZED: False}


def _crop_pair(a: BoolArray, b: BoolArray, margin: int) -> tuple[BoolArray, BoolArray]:
    """Crop both masks to the union's bounding box + ``margin`` voxels (zero-padded at the borders), so
    surfaces and distances are unchanged but the distance transforms run on a small array."""
    union = a | b
    lo, hi = [], []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    sl = tuple(slice(s, e) for s, e in zip(lo, hi, strict=True))
    pad = [(margin, margin)] * union.ndim
    return np.pad(a[sl], pad), np.pad(b[sl], pad)


def slice_dice(ref: BoolArray, pred: BoolArray, axis: int, indices: Iterable[int]) -> dict[int, float]:
    """2D Dice on the slices ``indices`` along ``axis`` (NaN when both are empty on a slice)."""
    out = {}
    for i in indices:
        out[int(i)] = dice(np.take(ref, int(i), axis=axis), np.take(pred, int(i), axis=axis))
    return out


def slice_axis_and_index(orientation: Any) -> tuple[int, Any]:
    """(original axis that is canonical S, function canonical k → original index) for an Orientation."""
    for axis, (target, flip) in enumerate(orientation.to_canonical):
        if int(target) == 2:
            n = orientation.original_shape[axis]
            return axis, (lambda k, n=n, flip=flip: int(k) if flip > 0 else n - 1 - int(k))
    raise ValueError("no original axis maps to the canonical S axis")


def evaluate_case(
    ref: npt.NDArray[np.integer[Any]],
    pred: npt.NDArray[np.integer[Any]],
    labels: Mapping[str, int],
    *,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    orientation: Any = None,
    known_slices: Sequence[int] | None = None,
    label_slices: Mapping[str, Sequence[int]] | None = None,
    surface_metrics: bool = True,
) -> dict[str, Any]:
    """All metrics of one case; ``ref`` and ``pred`` are label maps in the dataset's values, original grid.

    With ``known_slices`` (canonical k, needs ``orientation``) — the slices the crowd prompted or saw, the
    set an ``unprompted=ignore`` export keeps (``workers.exporter.known_slices``) — it adds, per label:
    ``Dice_known_slices``, Dice of the volume restricted to those slices (what nnU-Net scores on such an
    export, its ``ignore`` voxels left out), and ``slice_dice`` on the slices where that label was
    prompted (``label_slices``; all known slices when absent) with their mean ``slice_dice_mean``.
    """
    if ref.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    metrics: dict[str, dict[str, Any]] = {}
    slice_values: dict[str, dict[int, float]] = {}
    known: BoolArray | None = None
    axis = 0
    to_index: Any = None
    if known_slices is not None:
        axis, to_index = slice_axis_and_index(orientation)
        known = np.zeros(ref.shape, dtype=bool)
        idx = [to_index(k) for k in known_slices]
        sel: list[Any] = [slice(None)] * ref.ndim
        sel[axis] = idx
        known[tuple(sel)] = True
    for name, value in labels.items():
        r = ref == value
        p = pred == value
        row: dict[str, Any] = overlap(r, p)
        if surface_metrics:
            row.update(surface(r, p, spacing, tolerance_mm))
        if known is not None and known_slices is not None:
            row["Dice_known_slices"] = overlap(r, p, known)["Dice"]
            ks = list(label_slices[name]) if label_slices is not None and name in label_slices else list(
                known_slices)
            per_k = {int(k): d for k, d in zip(ks, slice_dice(r, p, axis, [to_index(k) for k in ks]).values(),
                                                strict=True)}
            slice_values[name] = per_k
            row["slice_dice_mean"] = nanmean(per_k.values())
            row["n_prompted_slices"] = len(ks)
        metrics[name] = row
    out: dict[str, Any] = {"metrics": metrics}
    if surface_metrics:
        out["hd95_penalty_mm"] = hd95_penalty(ref.shape, spacing)
    if known_slices is not None:
        out["n_known_slices"] = len(set(int(k) for k in known_slices))
    if slice_values:
        out["slice_dice"] = slice_values
    return out


def nanmean(values: Iterable[float | None]) -> float:
    arr = np.array([math.nan if v is None else float(v) for v in values], dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return math.nan
    return float(np.nanmean(arr))


def summarize(cases: Sequence[Mapping[str, Any]], labels: Mapping[str, int]) -> dict[str, Any]:
    """Class means (nanmean over cases) and foreground mean (mean of class means) for every metric key, and
    ``hd95``: per label how many cases entered the HD95 mean (``n``), how many of those are penalties
    (``penalized``, with their case ids) and how many were left out because both masks were empty."""
    keys: list[str] = []
    for case in cases:
        for row in case["metrics"].values():
            keys.extend(k for k in row if k not in keys and k != PENALIZED)
    mean = {name: {k: nanmean(c["metrics"][name].get(k) for c in cases) for k in keys} for name in labels}
    foreground = {k: float(np.mean([mean[name][k] for name in labels])) if labels else math.nan for k in keys}
    out: dict[str, Any] = {"mean": mean, "foreground_mean": foreground}
    if "HD95" in keys:
        per_label: dict[str, dict[str, Any]] = {}
        for name in labels:
            rows = [(c.get("case_id", i), c["metrics"][name]) for i, c in enumerate(cases)]
            penalized = [cid for cid, row in rows if row.get(PENALIZED)]
            values = [row.get("HD95") for _, row in rows]
            per_label[name] = {
                "n": sum(1 for v in values if v is not None and not math.isnan(v)),
                "penalized": len(penalized),
                "penalized_cases": penalized,
                "both_empty": sum(1 for v in values if v is None or math.isnan(v)),
            }
        out["hd95"] = {
            "rule": HD95_PENALTY_RULE,
            "per_label": per_label,
            "penalized": sum(v["penalized"] for v in per_label.values()),
            "n": sum(v["n"] for v in per_label.values()),
        }
    return out


def nnunet_summary(
    cases: Sequence[Mapping[str, Any]], labels: Mapping[str, int]
) -> dict[str, Any]:
    """``summary.json`` as nnU-Net writes it: keys are label values as strings, overlap metrics only."""
    per_case = []
    for case in cases:
        per_case.append({
            "reference_file": case.get("reference_file", f"{case['case_id']}.nii.gz"),
            "prediction_file": case.get("prediction_file", f"{case['case_id']}.nii.gz"),
            "metrics": {str(v): {k: case["metrics"][name][k] for k in OVERLAP_KEYS} for name, v in labels.items()},
        })
    mean = {str(v): {k: nanmean(c["metrics"][str(v)][k] for c in per_case) for k in OVERLAP_KEYS}
            for v in labels.values()}
    foreground = {k: float(np.mean([mean[str(v)][k] for v in labels.values()])) for k in OVERLAP_KEYS}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground}
