"""Evaluation runner: score each case's prediction against its reference, write summary.json and the report.

Predictions are label maps in the dataset's values on the case's original grid (segmentation masks as
written by the segmentation job, or uploads converted at request time). For segmentations the known
slices (prompted or seen when the segmentation started: ``Dice_known_slices``) come from
:func:`workers.exporter.known_slices`, the function that decides which slices an ``ignore`` export keeps;
the slices where each label was prompted (per-slice Dice) from ``stats["per_slice"]``.

The report shows the montage (:func:`app.imaging.figures.volume_montage`) of the worst and the best case by
mean Dice over the labels: CT, prediction (fill), reference (contours) and — for segmentations — the crowd's
boxes the segmentation used; uploaded predictions have no boxes.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from app.core.db import session_scope
from app.core.labelmaps import load_label_map
from app.core.storage import Storage
from app.evaluations.jobs import EvaluationCase, EvaluationParams
from app.evaluations.statistics import json_safe
from app.imaging.coords import Orientation
from app.imaging.figures import Mark, canonical_spacing, volume_montage
from app.jobs.runner import JobContext, params_model, row_and_dataset
from app.segmentations.figures import used_marks
from app.segmentations.models import Segmentation
from app.segmentations.repository import SegmentationRepository
from app.volumes import slices
from app.volumes.models import Volume
from workers.exporter import known_slices
from workers.metrics import SURFACE_LIBRARY, evaluate_case, nnunet_summary, summarize
from workers.report import render_report


def label_slices_from_stats(stats: dict[str, Any], labels: dict[str, int]) -> dict[str, list[int]] | None:
    """Per label, the canonical slices where it was prompted (None when per-slice detail is absent)."""
    per_slice = stats.get("per_slice") or {}
    out: dict[str, list[int]] = {name: [] for name in labels}
    found = False
    for k, entry in per_slice.items():
        for name in entry or {}:
            if name in out:
                out[name].append(int(k))
                found = True
    return {name: sorted(ks) for name, ks in out.items()} if found else None


def evaluate(context: JobContext) -> dict[str, Any]:
    """Score every case, store summary.json and the report; returns the row's result column."""
    params: EvaluationParams = params_model(context, EvaluationParams)
    storage = context.storage
    with session_scope() as session:
        row, dataset = row_and_dataset(session, context)
        labels = dict(sorted(dataset.labels.items(), key=lambda kv: kv[1]))
        title = f"Evaluation {row.id} — dataset {dataset.name!r}"
        window = (float(dataset.window_level), float(dataset.window_width))
        plans = [_plan(session, case) for case in params.cases]
    tolerance = params.nsd_tolerance_mm
    cases = []
    for i, plan in enumerate(plans):
        cases.append(_case(storage, plan, labels, tolerance))
        context.progress(i + 1, len(plans))
    summary = summarize(cases, labels)
    side_by_side = {
        name: {k: summary["mean"][name].get(k) for k in ("Dice", "Dice_known_slices", "slice_dice_mean")
               if k in summary["mean"][name]}
        for name in labels
    }
    result = json_safe({
        "labels": labels,
        "source": params.source,
        "model": params.model,
        "training_id": params.training_id,
        "nsd_tolerance_mm": tolerance,
        "surface_library": SURFACE_LIBRARY,
        "cases": cases,
        "mean": summary["mean"],
        "foreground_mean": summary["foreground_mean"],
        "side_by_side": side_by_side,
        "hd95": summary["hd95"],
        "missing_cases": params.missing_cases,
        "summary": nnunet_summary(cases, labels),
    })
    prefix = f"evaluations/{context.row_id}/result"  # beside predictions/ (an upload's), which stay
    try:
        with tempfile.TemporaryDirectory(prefix="crowdsam-eval-") as tmp:
            summary_path = Path(tmp) / "summary.json"
            summary_path.write_text(json.dumps(result["summary"], indent=2, sort_keys=True))
            storage.put_file(f"{prefix}/summary.json", summary_path)
            report_path = Path(tmp) / "report.html"
            montages = _montages(storage, plans, cases, labels, window)
            report_path.write_text(render_report(result, title=title, montages=montages), encoding="utf-8")
            storage.put_file(f"{prefix}/report.html", report_path)
    except BaseException:
        storage.delete_prefix(prefix)  # a failed attempt leaves no file behind
        raise
    result["summary_key"] = f"{prefix}/summary.json"
    result["report_key"] = f"{prefix}/report.html"
    return {"result": result}


def _plan(session: Any, case: EvaluationCase) -> dict[str, Any]:
    volume = session.get(Volume, case.volume_id)
    if volume is None or volume.reference_key is None:
        raise LookupError(f"case {case.case_id}: volume or reference is gone")
    plan = {**case.model_dump(), "reference_key": volume.reference_key, "spacing": list(volume.spacing),
            "affine": volume.affine, "shape": list(volume.shape), "split": volume.split, "stats": None,
            "canonical_key": volume.canonical_key}
    if case.segmentation_id is not None:
        seg = session.get(Segmentation, case.segmentation_id)
        if seg is None:
            raise LookupError(f"case {case.case_id}: segmentation {case.segmentation_id} is gone")
        plan["stats"] = dict(seg.stats or {})
        plan["known_slices"] = known_slices(session, seg)
    return plan


def _case(storage: Storage, plan: dict[str, Any], labels: dict[str, int], tolerance: float) -> dict[str, Any]:
    ref = load_label_map(storage, plan["reference_key"])
    pred = load_label_map(storage, plan["prediction_key"])
    stats = plan["stats"]
    prompted = known = None
    label_slices = None
    if stats is not None and stats.get("prompted_slices") is not None:
        prompted = sorted(int(k) for k in stats["prompted_slices"])
        known = plan["known_slices"]
        label_slices = label_slices_from_stats(stats, labels) or {name: prompted for name in labels}
    out = evaluate_case(
        ref, pred, labels, spacing=plan["spacing"], tolerance_mm=tolerance,
        orientation=Orientation.from_affine(plan["affine"], plan["shape"]),
        known_slices=known, label_slices=label_slices,
    )
    return {
        "case_id": plan["case_id"],
        "volume_id": plan["volume_id"],
        "split": plan["split"],
        "segmentation_id": plan.get("segmentation_id"),
        "reference_file": f"{plan['case_id']}.nii.gz",
        "prediction_file": plan.get("prediction_file") or f"{plan['case_id']}.nii.gz",
        "prompted_slices": prompted,
        "known_slices": known,
        **out,
    }


def mean_dice(case: dict[str, Any], labels: dict[str, int]) -> float:
    """A case's mean Dice over the labels scored (NaN = both empty, left out); NaN when none was scored."""
    values = [float(v) for n in labels if (v := case["metrics"][n].get("Dice")) is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def worst_and_best(cases: list[dict[str, Any]], labels: dict[str, int]) -> list[tuple[str, int]]:
    """(caption, case index) of the worst and the best case by mean Dice (one entry when they coincide)."""
    scored = [(mean_dice(c, labels), i) for i, c in enumerate(cases)]
    scored = [(d, i) for d, i in scored if not math.isnan(d)]
    if not scored:
        return []
    worst, best = min(scored), max(scored, key=lambda t: (t[0], -t[1]))
    if worst[1] == best[1]:
        return [(f"Only scored case (mean Dice {worst[0]:.3f})", worst[1])]
    return [(f"Worst case (mean Dice {worst[0]:.3f})", worst[1]), (f"Best case (mean Dice {best[0]:.3f})", best[1])]


def _marks(plan: dict[str, Any], labels: dict[str, int]) -> dict[int, list[Mark]]:
    """The crowd's prompts a segmentation used (none for an uploaded prediction)."""
    if plan.get("segmentation_id") is None or plan["stats"] is None:
        return {}
    with session_scope() as session:
        prompts = SegmentationRepository(session).prompts(plan["volume_id"], list(labels))
        return used_marks(prompts, plan["stats"], labels)


def _montages(storage: Storage, plans: list[dict[str, Any]], cases: list[dict[str, Any]], labels: dict[str, int],
              window: tuple[float, float]) -> list[dict[str, str]]:
    """The worst and the best case's montages as {caption, case_id, png (base64)} for the report."""
    out = []
    for caption, index in worst_and_best(cases, labels):
        plan, case = plans[index], cases[index]
        orientation = Orientation.from_affine(plan["affine"], plan["shape"])
        spacing = canonical_spacing(plan["affine"], plan["shape"], plan["spacing"])
        ref = orientation.canonical(load_label_map(storage, plan["reference_key"]))
        pred = orientation.canonical(load_label_map(storage, plan["prediction_key"]))
        png = volume_montage(
            slices.canonical_array(storage, plan["canonical_key"]), pred, ref, _marks(plan, labels), labels,
            window=window, spacing=spacing, title=f"{case['case_id']} — {caption.lower()}",
            prompted=case.get("prompted_slices") or [],
        )
        out.append({"caption": caption, "case_id": str(case["case_id"]),
                    "png": base64.b64encode(png).decode("ascii")})
    return out
