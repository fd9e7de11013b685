"""Fusion against careless annotators: 5 careful vs 4 careful + 1 careless, on the real CT with LiteMedSAM.

Each crowd sees every slice of the volume (organ-free slices too: a careful annotator answers
"nothing here", the careless one sometimes boxes an organ that is not there), boxes are simulated by
``app.prompts.simulate.simulate_crowd`` (careful: jitter 0.05, miss 0.02, false positives 0.005 per
absent organ and slice; careless: its defaults, jitter 0.2, miss 0.3, false positives 0.1). Every
crowd is segmented with majority, STAPLE and reliability-weighted fusion (Dawid–Skene estimates from
the crowd's own presence votes, ``app.crowd.reliability``); silence is an "absent" vote throughout.

Per organ: mean per-slice Dice over the slices that hold it, and the number of organ-free slices
where the fused mask claims it (false-positive slices). The last line compares the careless crowd
with the careful one: ``careless-vs-careful max |dDice| = X (goal <= 0.01) <method>``.

Run: ``.venv/bin/python bench/crowd_quality.py [--case example_ct] [--seed 0] [--device cpu]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.runtime import configure_process  # noqa: E402

configure_process(runs_models=True)  # before torch loads OpenMP

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from app.crowd.reliability import estimate, presence_votes  # noqa: E402
from app.imaging.coords import Orientation  # noqa: E402
from app.imaging.metrics import dice  # noqa: E402
from app.prompts.simulate import simulate_crowd  # noqa: E402
from workers.sam.engine import PromptIn, SegmentationEngine  # noqa: E402

CT = ROOT / "data" / "samples" / "totalsegmentator"
CASES = {"example_ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
         "example_ct_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz")}
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}
WINDOW = (40.0, 400.0)
METHODS = ("majority", "staple", "weighted")
CAREFUL = {"jitter": 0.05, "miss_rate": 0.02, "false_positive_rate": 0.005}


def load(case: str) -> tuple[np.ndarray, np.ndarray]:
    image, reference = (nib.load(CT / name) for name in CASES[case])
    orientation = Orientation.from_affine(image.affine, image.shape)
    canonical = np.asarray(orientation.canonical(np.asanyarray(image.dataobj)))
    raw = np.asarray(orientation.canonical(np.asanyarray(reference.dataobj).astype(np.int16)))
    return canonical, np.where(np.isin(raw, list(LABELS.values())), raw, 0).astype(np.uint8)


def crowd(ref: np.ndarray, careless: int, seed: int) -> tuple[dict[int, list[PromptIn]], dict[int, set[str]], int]:
    sim = simulate_crowd(ref, LABELS, annotators=5, coverage=1.0, seed=seed, organ_free_slices=True,
                         careless=careless, **CAREFUL)  # type: ignore[arg-type]
    prompts: dict[int, list[PromptIn]] = defaultdict(list)
    for b in sim.boxes:
        prompts[b.k].append(PromptIn(f"a{b.annotator}", b.label, "box", b.box))
    views: dict[int, set[str]] = defaultdict(set)
    for i, slices in sim.seen.items():
        for k in slices:
            views[k].add(f"a{i}")
    return dict(prompts), dict(views), sum(b.false_positive for b in sim.boxes)


def score(labels: np.ndarray, ref: np.ndarray) -> dict[str, tuple[float, int]]:
    """organ → (mean per-slice Dice over slices holding it, organ-free slices where the mask claims it)."""
    out = {}
    for name, value in LABELS.items():
        truth, pred = ref == value, labels == value
        holding = np.flatnonzero(truth.any(axis=(0, 1)))
        per_slice = [dice(truth[:, :, k], pred[:, :, k]) for k in holding]
        false_slices = int((pred.any(axis=(0, 1)) & ~truth.any(axis=(0, 1))).sum())
        out[name] = (float(np.mean(per_slice)) if per_slice else float("nan"), false_slices)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="example_ct", choices=sorted(CASES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    canonical, ref = load(args.case)
    results: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory() as cache:
        engine = SegmentationEngine("litemedsam", device=args.device, cache_dir=Path(cache), threads=args.threads)
        for scenario, careless in (("5 careful", 0), ("4 careful + 1 careless", 1)):
            prompts, views, false_boxes = crowd(ref, careless, args.seed)
            drew = [(k, p.annotator, p.label) for k, given in prompts.items() for p in given]
            reliability = estimate(presence_votes(views, drew, LABELS))
            weights = {a: (r.sensitivity, r.specificity) for a, r in reliability.annotators.items()}
            print(f"{scenario}: {sum(len(v) for v in prompts.values())} boxes ({false_boxes} false positives) on "
                  f"{len(prompts)} slices; Dawid–Skene (sens, spec): "
                  + ", ".join(f"{a} ({w[0]:.2f}, {w[1]:.2f})" for a, w in sorted(weights.items())), flush=True)
            for method in METHODS:
                started = time.perf_counter()
                out = engine.segment(canonical, window=WINDOW, image_id=args.case, prompts=prompts,
                                     label_values=LABELS, fusion=method, views=views, reliability=weights)
                results[(scenario, method)] = score(out.labels, ref)
                print(f"  {method}: {time.perf_counter() - started:.1f} s (encoded {out.encoded}, "
                      f"decoded {out.decoded})", flush=True)
    organs = list(LABELS)
    print(f"\n{args.case}, seed {args.seed}: mean per-slice Dice over slices holding the organ "
          "(false-positive slices in brackets)")
    print(f"| crowd | fusion | {' | '.join(organs)} | mean |")
    print("|---|---|" + "---|" * (len(organs) + 1))
    for (scenario, method), per in results.items():
        cells = [f"{per[o][0]:.3f} [{per[o][1]}]" for o in organs]
        print(f"| {scenario} | {method} | {' | '.join(cells)} | {np.nanmean([per[o][0] for o in organs]):.3f} |")
    gaps = {m: max(abs(results[("4 careful + 1 careless", m)][o][0] - results[("5 careful", m)][o][0])
                   for o in organs) for m in METHODS}
    best = min(gaps, key=lambda m: gaps[m])
    print(f"careless-vs-careful max |dDice| = {gaps[best]:.4f} (goal <= 0.01) {best}; "
          + ", ".join(f"{m} {g:.4f}" for m, g in gaps.items()))


if __name__ == "__main__":
    main()
