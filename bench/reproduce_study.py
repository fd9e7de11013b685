"""Reproduce the study's analysis on the shared CT, with statistics over simulation seeds.

For each shared CT case (``--cases``: ``example_ct``, ``example_ct_sm``) with its reference masks, each
``--coverage`` and each of ``--seeds`` seeds:

1. simulate a crowd on the reference (``app.prompts.simulate.simulate_crowd``: tight boxes, one per
   connected 2D part, Gaussian edge jitter, 3 annotators, each sees an organ slice with probability
   ``coverage``, so at coverage < 1 some organ slices stay unseen);
2. segment with LiteMedSAM through ONE engine (``workers.sam.engine``; its embedding cache is shared by
   every seed and coverage: the image is the same, so each slice is encoded once), majority fusion, with
   the simulation's views (every slice an annotator saw votes; silence is "absent");
3. segment again with ``fill_gaps=N`` (default 3): derived boxes, interpolated between the consensus boxes
   of two prompted slices of an organ at most N slices apart, on the unseen slices between them. The
   prompted slices come from the decode cache (same prompts and voters), so this costs the derived
   slices only;
4. score against the reference (``workers.metrics.evaluate_case``) per organ:
   - **slice**: mean 2D Dice over the prompted slices that hold the organ (the study's per-slice Dice);
   - **vol**: 3D Dice of the whole volume, unprompted slices = background (the study's per-volume Dice);
   - **known**: 3D Dice restricted to the known slices (prompted or seen,
     ``workers.nnunet.known_slice_set``: what an ``unprompted=ignore`` export keeps), checked against
     nnU-Net's own ``compute_metrics`` with its ignore label;
   - **gap vol**: 3D Dice of the whole volume of the ``fill_gaps`` segmentation;
   - **derived**: mean 2D Dice on the derived slices of the organ (how good the gap-filling labels are);
   - HD95 (a missed or hallucinated organ gets the field-of-view diagonal, counted: ``workers/metrics.py``);
5. per case and coverage: mean over seeds and a 95 % percentile bootstrap interval (``--resamples``
   resamples of the seeds, fixed rng), as a markdown table beside the study's BTCV numbers
   (``seed/results/BTCV/{slice,volume}_dice.csv``; their intervals resample the study's 11 patients).

The intervals are over simulation seeds on one volume: they say how much the crowd's randomness moves
the number, not how it would vary over patients (docs/reproduction.md).

Run: ``.venv/bin/python bench/reproduce_study.py --seeds 20 [--coverage 0.3 0.5 1.0] [--cases ...]
[--fill-gaps 3] [--threads 2] [--device cuda] [--budget-min 40] [--json out.json]``.
SIGINT/SIGTERM or ``--budget-min`` stop between seeds and report the seeds that ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
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
from workers.nnunet import LabelMapping, known_slice_set, unknown_slice_mask  # noqa: E402

CT = ROOT / "data" / "samples" / "totalsegmentator"
SEED = ROOT / "data" / "samples" / "seed" / "results" / "BTCV"
CASES = {"example_ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
         "example_ct_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz")}
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}  # TotalSegmentator values
STUDY_COLUMNS = {"spleen": "spleen_dice", "kidney_right": "rkidney_dice", "kidney_left": "lkidney_dice",
                 "liver": "liver_dice", "aorta": "aorta_dice"}
STUDY_MODELS = {"SAM-vit_h": "SAM ViT-H", "MedSAM-vit_b": "MedSAM ViT-B"}
WINDOW = (40.0, 400.0)
METRICS = ("slice", "vol", "known", "gap_vol", "derived")
METRIC_TITLES = {"slice": "slice", "vol": "vol", "known": "known", "gap_vol": "gap vol", "derived": "derived"}
BOOTSTRAP_SEED = 20240607


# ---------------------------------------------------------------- statistics

def bootstrap(values: Iterable[float], resamples: int = 2000, seed: int = BOOTSTRAP_SEED,
              statistic: Callable[[np.ndarray], float] | None = None,
              ) -> tuple[float, float, float, int]:
    """Mean and 95 % percentile bootstrap interval of ``values`` (NaNs dropped): (mean, low, high, n).

    ``resamples`` draws with replacement from a fixed-seed rng, so the interval is reproducible; one value
    gives a zero-width interval, none gives NaNs."""
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan, 0
    if arr.size == 1:
        return float(arr[0]), float(arr[0]), float(arr[0]), 1
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(resamples, arr.size))
    means = arr[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(arr.mean()), float(low), float(high), int(arr.size)


def cluster_bootstrap(groups: Sequence[Sequence[float]], resamples: int = 2000, seed: int = BOOTSTRAP_SEED,
                      ) -> tuple[float, float, float, int]:
    """Pooled mean of all values and a 95 % percentile bootstrap interval resampling whole groups (patients)."""
    kept = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not kept:
        return math.nan, math.nan, math.nan, 0
    sums = np.array([g.sum() for g in kept])
    counts = np.array([g.size for g in kept])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(kept), size=(resamples, len(kept)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(sums.sum() / counts.sum()), float(low), float(high), len(kept)


# ---------------------------------------------------------------- the study's numbers

def study_numbers(resamples: int = 2000) -> dict[str, dict[str, dict[str, list[float]]]]:
    """model → "slice"|"volume" → organ → [mean, low, high, n patients] from the study's BTCV tables.

    Per slice: the mean of all non-NaN slice rows (pooled over patients, as the study averaged), the
    interval resampling patients; per volume: mean over patients (non-NaN), interval over patients."""
    out: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: {"slice": {}, "volume": {}})
    for kind, name in (("slice", "slice_dice.csv"), ("volume", "volume_dice.csv")):
        rows: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        with (SEED / name).open() as fh:
            for row in csv.DictReader(fh):
                for organ, column in STUDY_COLUMNS.items():
                    value = float(row[column])
                    if not math.isnan(value):
                        rows[row["model"]][organ][row["path"]].append(value)
        for model, organs in rows.items():
            for organ, per_case in organs.items():
                if kind == "slice":
                    stats = cluster_bootstrap(list(per_case.values()), resamples)
                else:
                    stats = bootstrap([float(np.mean(v)) for v in per_case.values()], resamples)
                out[model][kind][organ] = list(stats)
    return dict(out)


# ---------------------------------------------------------------- one case

@dataclass
class Case:
    name: str
    image: Any  # nib.Nifti1Image
    ref: np.ndarray  # original grid, LABELS values only
    orientation: Orientation
    canonical: np.ndarray
    canonical_ref: np.ndarray
    spacing: tuple[float, ...]
    holds: dict[str, set[int]]  # organ → canonical slices holding at least one voxel of it
    organ_slices: int

    @classmethod
    def load(cls, name: str) -> Case:
        image_file, seg_file = CASES[name]
        image: Any = nib.load(str(CT / image_file))
        data = np.asarray(image.dataobj)
        seg_image: Any = nib.load(str(CT / seg_file))
        seg = np.asarray(seg_image.dataobj).astype(np.int32)
        ref = np.where(np.isin(seg, list(LABELS.values())), seg, 0).astype(np.int32)
        orientation = Orientation.from_affine(image.affine, data.shape)
        canonical_ref = np.asarray(orientation.canonical(ref))
        holds = {o: {int(k) for k in np.flatnonzero((canonical_ref == v).any((0, 1)))} for o, v in LABELS.items()}
        return cls(name, image, ref, orientation, np.asarray(orientation.canonical(data)), canonical_ref,
                   tuple(float(s) for s in image.header.get_zooms()[:3]), holds,
                   len(set().union(*holds.values())))


def nnunet_ignore_dice(case: Case, pred: np.ndarray, known: Sequence[int], tmp: Path) -> dict[str, float]:
    """Dice from nnU-Net's own ``compute_metrics`` with the reference's unknown slices set to ``ignore``."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    mapping = LabelMapping(LABELS, with_ignore=True)
    ref_export = mapping.to_export(case.ref)
    ignore = mapping.ignore_value
    assert ignore is not None
    ref_export[unknown_slice_mask(case.orientation, known)] = ignore
    save_label_map(ref_export, case.image, tmp / "ref.nii.gz")
    save_label_map(mapping.to_export(pred), case.image, tmp / "pred.nii.gz")
    result = compute_metrics(str(tmp / "ref.nii.gz"), str(tmp / "pred.nii.gz"), SimpleITKIO(),
                             list(mapping.export_values.values()), ignore_label=ignore)
    return {name: float(result["metrics"][v]["Dice"]) for name, v in mapping.export_values.items()}


def run_once(engine: Any, case: Case, coverage: float, seed: int, *, annotators: int, jitter: float,
             fill_gaps: int, check_nnunet: bool) -> dict[str, Any]:
    """One simulated crowd on ``case``: both segmentations and every per-organ number of this seed."""
    from workers.sam.engine import PromptIn

    sim = simulate_crowd(case.canonical_ref, LABELS, annotators=annotators, jitter=jitter, coverage=coverage,
                         seed=seed)
    prompts: dict[int, list[Any]] = defaultdict(list)
    for b in sim.boxes:
        prompts[b.k].append(PromptIn(annotator=f"sim{b.annotator}", label=b.label, kind="box", coords=b.box))
    views: dict[int, list[str]] = defaultdict(list)
    for i, seen in sim.seen.items():
        for k in seen:
            views[int(k)].append(f"sim{i}")
    common = dict(window=WINDOW, image_id=f"bench-{case.name}", prompts=dict(prompts), label_values=LABELS,
                  fusion="majority", views=dict(views))
    started = time.perf_counter()
    out = engine.segment(case.canonical, **common)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    gap = engine.segment(case.canonical, fill_gaps=fill_gaps, **common) if fill_gaps > 0 else out
    gap_seconds = time.perf_counter() - started

    started = time.perf_counter()
    pred = np.asarray(case.orientation.original(out.labels)).astype(np.int32)
    gap_pred = np.asarray(case.orientation.original(gap.labels)).astype(np.int32)
    prompted_organ = {o: sorted({b.k for b in sim.boxes if b.label == o} & case.holds[o]) for o in LABELS}
    known = known_slice_set(out.prompted_slices, (k for ks in sim.seen.values() for k in ks))
    scored = evaluate_case(case.ref, pred, LABELS, spacing=case.spacing, tolerance_mm=2.0,
                           orientation=case.orientation, known_slices=known, label_slices=prompted_organ)
    derived_organ = {o: sorted(k for k in gap.derived_slices if o in gap.per_slice.get(k, {})) for o in LABELS}
    gap_scored = evaluate_case(case.ref, gap_pred, LABELS, spacing=case.spacing, orientation=case.orientation,
                               known_slices=sorted(set(known) | set(gap.derived_slices)),
                               label_slices=derived_organ, surface_metrics=False)
    nnunet: dict[str, float] = {}
    if check_nnunet:
        with tempfile.TemporaryDirectory() as tmp:
            nnunet = nnunet_ignore_dice(case, pred, known, Path(tmp))
    organs: dict[str, dict[str, Any]] = {}
    for o in LABELS:
        m, g = scored["metrics"][o], gap_scored["metrics"][o]
        organs[o] = {"slice": m["slice_dice_mean"], "vol": m["Dice"], "known": m["Dice_known_slices"],
                     "gap_vol": g["Dice"], "derived": g["slice_dice_mean"], "gap_known": g["Dice_known_slices"],
                     "nsd": m["NSD"], "hd95": m["HD95"], "hd95_penalized": bool(m[PENALIZED]),
                     "nnunet_ignore": nnunet.get(o, math.nan), "prompted_slices": len(prompted_organ[o]),
                     "derived_slices": len(derived_organ[o])}
    return {"case_id": case.name, "coverage": coverage, "seed": seed, "annotators": annotators, "organs": organs,
            "n_slices": int(case.canonical.shape[2]), "organ_slices": case.organ_slices,
            "prompted": len(out.prompted_slices), "known": len(known), "derived": len(gap.derived_slices),
            "boxes": len(sim.boxes), "encoded": out.encoded + gap.encoded, "decoded": out.decoded + gap.decoded,
            "seconds": seconds, "gap_seconds": gap_seconds, "eval_seconds": time.perf_counter() - started,
            "encoder_seconds": out.timings.get("encoder_s", 0.0) + (gap.timings.get("encoder_s", 0.0) if gap is not out
                                                                   else 0.0),
            "decoder_seconds": out.timings.get("decoder_s", 0.0) + (gap.timings.get("decoder_s", 0.0) if gap is not out
                                                                   else 0.0)}


# ---------------------------------------------------------------- report

def fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def fmt_ci(stats: Sequence[float]) -> str:
    mean, low, high = stats[0], stats[1], stats[2]
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def summarize(runs: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """Per organ and metric: [mean, low, high, n seeds]; "mean" = per seed the mean over organs, then the same."""
    out: dict[str, Any] = {}
    for o in LABELS:
        out[o] = {k: list(bootstrap((r["organs"][o][k] for r in runs), resamples))
                  for k in (*METRICS, "gap_known", "hd95")}
        out[o]["hd95_penalized"] = sum(1 for r in runs if r["organs"][o]["hd95_penalized"])
    out["mean"] = {k: list(bootstrap((nanmean(r["organs"][o][k] for o in LABELS) for r in runs), resamples))
                   for k in (*METRICS, "gap_known", "hd95")}
    return out


def report(case: Case, coverage: float, fill_gaps: int, runs: list[dict[str, Any]],
           study: dict[str, Any], resamples: int) -> dict[str, Any]:
    summary = summarize(runs, resamples)

    def mean_of(key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    print(f"\n=== coverage {coverage} per annotator ({case.name}, {runs[0]['annotators']} annotators, "
          f"{len(runs)} seeds, fill_gaps={fill_gaps}) ===")
    print(f"per seed (mean): {mean_of('prompted'):.1f}/{case.organ_slices} organ slices prompted, "
          f"{mean_of('known'):.1f} known, {mean_of('derived'):.1f} derived of {case.canonical.shape[2]} slices, "
          f"{mean_of('boxes'):.0f} boxes; encoded {sum(r['encoded'] for r in runs)} slices in all, "
          f"decoded {mean_of('decoded'):.1f} slices per seed; segment {mean_of('seconds'):.1f} s + "
          f"fill_gaps {mean_of('gap_seconds'):.1f} s + scoring {mean_of('eval_seconds'):.1f} s per seed")
    sam, med = (study.get(m, {"slice": {}, "volume": {}}) for m in STUDY_MODELS)
    print("\n| organ | study slice SAM-H / MedSAM | study vol SAM-H / MedSAM | "
          + " | ".join(METRIC_TITLES[k] for k in METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for o in [*LABELS, "mean"]:
        if o == "mean":
            s_sl = [nanmean(s["slice"].get(x, [math.nan])[0] for x in LABELS) for s in (sam, med)]
            s_vol = [nanmean(s["volume"].get(x, [math.nan])[0] for x in LABELS) for s in (sam, med)]
        else:
            s_sl = [s["slice"].get(o, [math.nan])[0] for s in (sam, med)]
            s_vol = [s["volume"].get(o, [math.nan])[0] for s in (sam, med)]
        name = "**mean**" if o == "mean" else o
        print(f"| {name} | {fmt(s_sl[0])} / {fmt(s_sl[1])} | {fmt(s_vol[0])} / {fmt(s_vol[1])} | "
              + " | ".join(fmt_ci(summary[o][k]) for k in METRICS) + " |")
    penalized = sum(summary[o]["hd95_penalized"] for o in LABELS)
    hd = ", ".join(f"{o} {fmt(summary[o]['hd95'][0])}" for o in LABELS)
    print(f"\nHD95 penal.: {penalized} of {len(runs) * len(LABELS)} (seed, organ) HD95 values are the penalty "
          f"(organ missed or hallucinated: the field-of-view diagonal, kept in the mean); mean HD95 mm: {hd}")
    diffs = [abs(r["organs"][o]["known"] - r["organs"][o]["nnunet_ignore"]) for r in runs for o in LABELS
             if not math.isnan(r["organs"][o]["nnunet_ignore"]) and not math.isnan(r["organs"][o]["known"])]
    worst = max(diffs) if diffs else math.nan
    print(f"max |vol@known − nnU-Net compute_metrics(ignore_label)| = {worst:.2e} over {len(diffs)} (seed, organ)")
    return {"case_id": case.name, "coverage": coverage, "fill_gaps": fill_gaps, "seeds": [r["seed"] for r in runs],
            "summary": summary, "max_ignore_diff": worst}


def print_study(study: dict[str, Any]) -> None:
    print("Study (BTCV, 11 patients, real crowd boxes): mean Dice [95 % bootstrap interval over patients]")
    print("\n| model | Dice | " + " | ".join(LABELS) + " |")
    print("|---|---|" + "---|" * len(LABELS))
    for model, title in STUDY_MODELS.items():
        if model not in study:
            continue
        for kind in ("slice", "volume"):
            print(f"| {title} | {kind} | " + " | ".join(fmt_ci(study[model][kind].get(o, [math.nan] * 3))
                                                     for o in LABELS) + " |")


# ---------------------------------------------------------------- main

class Stop(Exception):
    """SIGTERM: stop between runs and report what ran."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coverage", type=float, nargs="+", default=[0.3, 0.5, 1.0],
                        help="probability that an annotator sees an organ slice")
    parser.add_argument("--seeds", type=int, default=3, help="simulation seeds per case and coverage (docs: 20)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed .. seed+seeds-1)")
    parser.add_argument("--annotators", type=int, default=3)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--fill-gaps", type=int, default=3,
                        help="derived boxes in gaps of at most N unseen slices (0: no gap-filled run)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--no-nnunet-check", action="store_true",
                        help="skip nnU-Net's compute_metrics cross-check of the known-slice Dice")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: the engine's choice)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine caches (default: the settings')")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="do not start a seed that would end past this many minutes (estimated from the last)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="CT cases to run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    wall = time.perf_counter()

    from workers.sam.engine import SegmentationEngine, get_engine

    engine = SegmentationEngine("litemedsam", device=args.device, threads=args.threads, cache_dir=args.cache_dir) if (
        args.device or args.threads or args.cache_dir) else get_engine("litemedsam")
    study = study_numbers(args.resamples)
    print_study(study)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs: list[dict[str, Any]] = []
    stopped = None
    cases: list[Case] = []
    try:
        for name in args.cases:
            case = Case.load(name)
            cases.append(case)
            last = 0.0
            for seed in seeds:
                elapsed = time.perf_counter() - wall
                if args.budget_min is not None and elapsed + last > 60 * args.budget_min:
                    stopped = f"budget: {elapsed / 60:.1f} min used, the next seed would take ~{last / 60:.1f} min"
                    break
                started = time.perf_counter()
                done = []
                for coverage in args.coverage:
                    r = run_once(engine, case, coverage, seed, annotators=args.annotators, jitter=args.jitter,
                                 fill_gaps=args.fill_gaps, check_nnunet=not args.no_nnunet_check)
                    done.append(r)
                    print(f"{name} coverage {coverage} seed {seed}: {r['prompted']}/{r['organ_slices']} prompted, "
                          f"{r['known']} known, {r['derived']} derived, {r['boxes']} boxes, encoded {r['encoded']}, "
                          f"decoded {r['decoded']}, {r['seconds']:.1f} + {r['gap_seconds']:.1f} + "
                          f"{r['eval_seconds']:.1f} s (encoder {r['encoder_seconds']:.1f} s, decoder "
                          f"{r['decoder_seconds']:.1f} s)", flush=True)
                runs.extend(done)  # a seed counts when all its coverages ran
                last = time.perf_counter() - started
            if stopped:
                break
    except (KeyboardInterrupt, Stop) as exc:
        stopped = f"interrupted ({type(exc).__name__} {exc})"
    if stopped:
        print(f"\nSTOPPED: {stopped}; reporting the complete seeds that ran", flush=True)
    results = []
    for case in cases:
        for coverage in args.coverage:
            selected = [r for r in runs if r["case_id"] == case.name and r["coverage"] == coverage]
            if selected:
                results.append(report(case, coverage, args.fill_gaps, selected, study, args.resamples))
    seconds = time.perf_counter() - wall
    if args.json:
        args.json.write_text(json.dumps({"study": study, "args": {k: str(v) for k, v in vars(args).items()},
                                         "stopped": stopped, "wall_seconds": seconds, "results": results,
                                         "runs": runs}, indent=1))
    print(f"\nreproduce_study cases={','.join(c.name for c in cases)} coverages={args.coverage} "
          f"seeds={len({r['seed'] for r in runs})} runs={len(runs)} fill_gaps={args.fill_gaps} "
          f"wall={seconds:.0f}s{' STOPPED' if stopped else ''}")


if __name__ == "__main__":
    main()
