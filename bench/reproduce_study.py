"""Reproduce the study's analysis on the shared CT: simulated crowd → LiteMedSAM → per-slice vs per-volume Dice.

For each shared CT case (``example_ct``, ``example_ct_sm``) with its reference masks:

1. simulate a crowd on the reference (``app.prompts.simulate.simulate_crowd``: tight boxes, one per
   connected 2D part, Gaussian edge jitter, 3 annotators, each sees a slice with probability
   ``coverage`` < 1, so some organ slices stay unprompted);
2. segment with LiteMedSAM through the engine (``workers.sam.engine.get_engine``), majority fusion;
3. score the SAM masks against the reference with ``workers.metrics.evaluate_case`` — per volume
   (unprompted slices count as background: the study's scoring), per volume restricted to the
   known slices (prompted or seen: what an ``unprompted=ignore`` nnU-Net export keeps), per prompted
   slice — and check the restricted Dice against nnU-Net's own ``compute_metrics`` with its ignore label;
   HD95 of a missed or hallucinated organ is the field-of-view diagonal and the table says how many
   cases got it (``workers/metrics.py``);
4. print everything beside the study's BTCV numbers (``seed/results/BTCV/{slice,volume}_dice.csv``).

Run: ``.venv/bin/python bench/reproduce_study.py [--coverage 0.5 0.3] [--device cpu|cuda] [--json out.json]``
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.runtime import configure_process  # noqa: E402

configure_process(runs_models=True)  # before torch loads OpenMP

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from app.imaging.coords import Orientation  # noqa: E402
from app.imaging.labelmaps import save_label_map  # noqa: E402
from app.prompts.simulate import simulate_crowd  # noqa: E402
from workers.metrics import PENALIZED, evaluate_case, nanmean  # noqa: E402
from workers.nnunet import LabelMapping, known_slice_set  # noqa: E402

CT = ROOT / "data" / "samples" / "totalsegmentator"
SEED = ROOT / "data" / "samples" / "seed" / "results" / "BTCV"
CASES = {"example_ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
         "example_ct_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz")}
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}  # TotalSegmentator values
STUDY_COLUMNS = {"spleen": "spleen_dice", "kidney_right": "rkidney_dice", "kidney_left": "lkidney_dice",
                 "liver": "liver_dice", "aorta": "aorta_dice"}
WINDOW = (40.0, 400.0)


def study_numbers() -> dict[str, dict[str, dict[str, float]]]:
    """model → {"slice"|"volume": {organ: mean Dice}} from the study's BTCV tables (NaN rows skipped)."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: {"slice": {}, "volume": {}})
    for kind, name in (("slice", "slice_dice.csv"), ("volume", "volume_dice.csv")):
        rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        with (SEED / name).open() as fh:
            for row in csv.DictReader(fh):
                for organ, column in STUDY_COLUMNS.items():
                    value = float(row[column])
                    if not math.isnan(value):
                        rows[row["model"]][organ].append(value)
        for model, organs in rows.items():
            out[model][kind] = {organ: float(np.mean(v)) for organ, v in organs.items()}
    return dict(out)


def load_case(name: str) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    image_file, seg_file = CASES[name]
    image = nib.load(str(CT / image_file))
    seg = np.asarray(nib.load(str(CT / seg_file)).dataobj).astype(np.int32)
    ref = np.where(np.isin(seg, list(LABELS.values())), seg, 0).astype(np.int32)
    return image, np.asarray(image.dataobj), ref


def nnunet_ignore_dice(ref: np.ndarray, pred: np.ndarray, image: nib.Nifti1Image, unknown: np.ndarray,
                       tmp: Path) -> dict[str, float]:
    """Dice from nnU-Net's own ``compute_metrics`` with the reference's unprompted slices set to ``ignore``."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    mapping = LabelMapping(LABELS, with_ignore=True)
    ref_export = mapping.to_export(ref)
    ref_export[unknown] = mapping.ignore_value
    save_label_map(ref_export, image, tmp / "ref.nii.gz")
    save_label_map(mapping.to_export(pred), image, tmp / "pred.nii.gz")
    result = compute_metrics(str(tmp / "ref.nii.gz"), str(tmp / "pred.nii.gz"), SimpleITKIO(),
                             list(mapping.export_values.values()), ignore_label=mapping.ignore_value)
    return {name: float(result["metrics"][v]["Dice"]) for name, v in mapping.export_values.items()}


def run_case(engine: Any, name: str, coverage: float, seed: int, jitter: float) -> dict[str, Any]:
    from workers.nnunet import unknown_slice_mask
    from workers.sam.engine import PromptIn

    image, data, ref = load_case(name)
    orientation = Orientation.from_affine(image.affine, data.shape)
    canonical = np.asarray(orientation.canonical(data))
    canonical_ref = np.asarray(orientation.canonical(ref))
    sim = simulate_crowd(canonical_ref, LABELS, annotators=3, jitter=jitter, coverage=coverage, seed=seed)
    prompts: dict[int, list[Any]] = defaultdict(list)
    for b in sim.boxes:
        prompts[b.k].append(PromptIn(annotator=f"sim{b.annotator}", label=b.label, kind="box", coords=b.box))
    organ_slices = sorted(int(k) for k in np.flatnonzero(np.isin(canonical_ref, list(LABELS.values())).any((0, 1))))
    started = time.perf_counter()
    out = engine.segment(canonical, window=WINDOW, image_id=f"bench-{name}", prompts=dict(prompts),
                         label_values=LABELS, fusion="majority")
    seconds = time.perf_counter() - started
    pred = np.asarray(orientation.original(out.labels)).astype(np.int32)
    label_slices = {n: sorted(int(k) for k, entry in out.per_slice.items() if n in entry) for n in LABELS}
    known = known_slice_set(out.prompted_slices, (k for ks in sim.seen.values() for k in ks))
    case = evaluate_case(ref, pred, LABELS, spacing=image.header.get_zooms()[:3], tolerance_mm=2.0,
                         orientation=orientation, known_slices=known, label_slices=label_slices)
    with tempfile.TemporaryDirectory() as tmp:
        unknown = unknown_slice_mask(orientation, known)
        case["nnunet_ignore_dice"] = nnunet_ignore_dice(ref, pred, image, unknown, Path(tmp))
    case.update(case_id=name, n_slices=int(canonical.shape[2]), organ_slices=len(organ_slices),
                prompted=len(out.prompted_slices), known=len(known), boxes=len(sim.boxes), encoded=out.encoded,
                seconds=seconds)
    return case


def fmt(v: float | None) -> str:
    return "  –  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def report(cases: list[dict[str, Any]], coverage: float, study: dict[str, Any]) -> dict[str, Any]:
    print(f"\n=== coverage {coverage} per annotator (3 annotators) ===")
    for c in cases:
        print(f"{c['case_id']}: {c['prompted']}/{c['organ_slices']} organ slices prompted, {c['known']} known "
              f"({c['n_slices']} slices), {c['boxes']} boxes, {c['encoded']} slices encoded, {c['seconds']:.1f} s")
    header = (f"{'organ':13s} | {'study slice':>11s} {'study vol':>9s} | {'ours slice':>10s} {'ours vol':>8s} "
              f"{'vol@known':>9s} {'nnU-Net ign':>11s} | {'NSD2mm':>6s} {'HD95mm':>6s} {'penal.':>6s}")
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {}
    sam_h = study.get("SAM-vit_h", {"slice": {}, "volume": {}})
    for organ in LABELS:
        sl = nanmean(v for c in cases for v in c["slice_dice"][organ].values())
        vol = nanmean(c["metrics"][organ]["Dice"] for c in cases)
        volk = nanmean(c["metrics"][organ]["Dice_known_slices"] for c in cases)
        ign = nanmean(c["nnunet_ignore_dice"][organ] for c in cases)
        nsd = nanmean(c["metrics"][organ]["NSD"] for c in cases)
        hd = nanmean(c["metrics"][organ]["HD95"] for c in cases)  # penalties included (workers/metrics.py)
        penalized = sum(1 for c in cases if c["metrics"][organ][PENALIZED])
        scored = sum(1 for c in cases if not math.isnan(c["metrics"][organ]["HD95"]))
        summary[organ] = {"slice": sl, "volume": vol, "volume_known": volk, "nnunet_ignore": ign,
                          "nsd": nsd, "hd95": hd, "hd95_penalized": penalized, "hd95_cases": scored,
                          "study_slice": sam_h["slice"].get(organ), "study_volume": sam_h["volume"].get(organ)}
        print(f"{organ:13s} | {fmt(sam_h['slice'].get(organ)):>11s} {fmt(sam_h['volume'].get(organ)):>9s} | "
              f"{fmt(sl):>10s} {fmt(vol):>8s} {fmt(volk):>9s} {fmt(ign):>11s} | {fmt(nsd):>6s} {fmt(hd):>6s} "
              f"{penalized:>2d}/{scored:<3d}")
    means = {k: nanmean(summary[o][k] for o in LABELS) for k in ("study_slice", "study_volume", "slice", "volume",
                                                                  "volume_known", "nnunet_ignore")}
    print(f"{'mean':13s} | {fmt(means['study_slice']):>11s} {fmt(means['study_volume']):>9s} | "
          f"{fmt(means['slice']):>10s} {fmt(means['volume']):>8s} {fmt(means['volume_known']):>9s} "
          f"{fmt(means['nnunet_ignore']):>11s} |")
    print(f"HD95 penal.: cases whose HD95 is the penalty (organ missed or hallucinated: the field-of-view diagonal, "
          f"kept in the mean) / cases in the mean; {sum(summary[o]['hd95_penalized'] for o in LABELS)} in all")
    worst = max(abs(c["metrics"][o]["Dice_known_slices"] - c["nnunet_ignore_dice"][o])
                for c in cases for o in LABELS if not math.isnan(c["nnunet_ignore_dice"][o]))
    print(f"max |vol@known − nnU-Net compute_metrics(ignore_label)| = {worst:.2e}")
    return {"coverage": coverage, "organs": summary, "means": means, "max_ignore_diff": worst,
            "cases": [{k: c[k] for k in ("case_id", "n_slices", "organ_slices", "prompted", "known", "boxes",
                                         "encoded", "seconds")} for c in cases]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coverage", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: the engine's choice)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="CT cases to run")
    args = parser.parse_args()

    from workers.sam.engine import SegmentationEngine, get_engine

    engine = SegmentationEngine("litemedsam", device=args.device, threads=args.threads) if (
        args.device or args.threads) else get_engine("litemedsam")
    study = study_numbers()
    print("Study (BTCV, 11 cases, real crowd boxes), mean Dice over organs' non-NaN entries:")
    for model, kinds in study.items():
        print(f"  {model:13s} per slice " + " ".join(f"{o}={kinds['slice'][o]:.3f}" for o in LABELS)
              + "\n  " + " " * 13 + " per vol   " + " ".join(f"{o}={kinds['volume'][o]:.3f}" for o in LABELS))
    results = []
    for coverage in args.coverage:
        cases = [run_case(engine, name, coverage, args.seed, args.jitter) for name in args.cases]
        results.append(report(cases, coverage, study))
    if args.json:
        args.json.write_text(json.dumps({"study": study, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
