"""Metrics and statistics: nnU-Net conventions, MONAI surface metrics with spacing, Wilcoxon + effect size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from app.evaluations.statistics import json_safe, paired_wilcoxon, rank_biserial
from workers.metrics import (
    evaluate_case,
    nnunet_summary,
    overlap,
    summarize,
    surface,
)


def cube(shape=(30, 30, 20), lo=(5, 5, 5), hi=(15, 15, 12)) -> np.ndarray:  # type: ignore[no-untyped-def]
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_overlap_follows_nnunet_formulas_and_nan_when_both_empty() -> None:
    ref = cube()
    pred = cube(lo=(6, 5, 5), hi=(16, 15, 12))
    row = overlap(ref, pred)
    tp, fp, fn = 9 * 10 * 7, 10 * 7, 10 * 7
    assert (row["TP"], row["FP"], row["FN"]) == (tp, fp, fn)
    assert row["TN"] == ref.size - tp - fp - fn
    assert row["Dice"] == 2 * tp / (2 * tp + fp + fn) and row["IoU"] == tp / (tp + fp + fn)
    assert row["n_pred"] == tp + fp and row["n_ref"] == tp + fn
    empty = np.zeros_like(ref)
    both_empty = overlap(empty, empty)
    assert math.isnan(both_empty["Dice"]) and math.isnan(both_empty["IoU"]) and both_empty["TN"] == ref.size
    assert overlap(ref, empty)["Dice"] == 0.0
    # restricted to a voxel subset (what an ignore label does)
    use = np.zeros_like(ref)
    use[:, :, 8:] = True
    restricted = overlap(ref, pred, use)
    assert restricted["TP"] == 9 * 10 * 4 and restricted["TN"] == use.sum() - 9 * 10 * 4 - 2 * 10 * 4


def test_surface_metrics_use_spacing() -> None:
    ref = cube()
    same = surface(ref, ref, (1.0, 1.0, 3.0), 2.0)
    assert same == {"NSD": 1.0, "HD95": 0.0}
    shifted_z = np.roll(ref, 1, axis=2)  # one voxel = 3 mm along z
    assert surface(ref, shifted_z, (1.0, 1.0, 3.0), 2.0)["HD95"] == pytest.approx(3.0)
    assert surface(ref, shifted_z, (1.0, 1.0, 3.0), 3.0)["NSD"] == pytest.approx(1.0)
    assert surface(ref, shifted_z, (1.0, 1.0, 3.0), 2.0)["NSD"] < 1.0
    shifted_x = np.roll(ref, 1, axis=0)  # one voxel = 1 mm along x: within 2 mm
    assert surface(ref, shifted_x, (1.0, 1.0, 3.0), 2.0) == {"NSD": 1.0, "HD95": pytest.approx(1.0)}
    empty = np.zeros_like(ref)
    both = surface(empty, empty, (1, 1, 1), 2.0)
    assert math.isnan(both["NSD"]) and math.isnan(both["HD95"])
    one = surface(ref, empty, (1, 1, 1), 2.0)
    assert one["NSD"] == 0.0 and math.isnan(one["HD95"])


def test_case_summary_and_prompted_slices() -> None:
    from app.imaging.coords import Orientation

    ref = np.zeros((30, 30, 20), dtype=np.int32)
    ref[cube()] = 1
    ref[cube(lo=(20, 20, 2), hi=(25, 25, 6))] = 5
    pred = ref.copy()
    pred[:, :, 5:8] = 0  # slices 5..7 "unprompted": nothing predicted there
    orientation = Orientation.from_affine(np.diag([1.0, 1.0, 3.0, 1.0]), ref.shape)
    prompted = [k for k in range(20) if k not in (5, 6, 7)]
    case = evaluate_case(ref, pred, {"spleen": 1, "liver": 5, "aorta": 52}, spacing=(1, 1, 3),
                         orientation=orientation, prompted_slices=prompted)
    m = case["metrics"]
    assert m["spleen"]["Dice"] == pytest.approx(2 * 4 / (7 + 4))  # 4 of 7 spleen slices kept
    assert m["spleen"]["Dice_prompted_slices"] == 1.0 and m["spleen"]["slice_dice_mean"] == 1.0
    assert m["liver"]["Dice"] == 2 * 3 / (4 + 3) and m["liver"]["Dice_prompted_slices"] == 1.0
    assert math.isnan(m["aorta"]["Dice"]) and math.isnan(m["aorta"]["slice_dice_mean"])
    assert set(case["slice_dice"]["spleen"]) == set(prompted)
    assert math.isnan(case["slice_dice"]["spleen"][0]) and case["slice_dice"]["spleen"][8] == 1.0
    labels = {"spleen": 1, "liver": 5, "aorta": 52}
    cases = [{"case_id": "a", **case}, {"case_id": "b", **evaluate_case(ref, ref, labels, spacing=(1, 1, 3))}]
    s = summarize(cases, labels)
    assert s["mean"]["spleen"]["Dice"] == pytest.approx((2 * 4 / 11 + 1) / 2)
    assert math.isnan(s["mean"]["aorta"]["Dice"]) and math.isnan(s["foreground_mean"]["Dice"])  # as nnU-Net
    nn = nnunet_summary(cases, labels)
    assert set(nn) == {"metric_per_case", "mean", "foreground_mean"}
    assert nn["metric_per_case"][0]["metrics"]["1"]["Dice"] == m["spleen"]["Dice"]
    assert json_safe(nn)["mean"]["52"]["Dice"] is None


def test_paired_wilcoxon_matches_scipy_and_effect_size() -> None:
    a = [0.91, 0.88, 0.93, 0.85, 0.90, 0.87, 0.95]
    b = [0.80, 0.85, 0.90, 0.86, 0.70, 0.81, 0.93]
    out = paired_wilcoxon(a, b)
    ref = wilcoxon(a, b)
    assert out["n"] == 7 and out["p_value"] == pytest.approx(ref.pvalue) and out["statistic"] == ref.statistic
    # ranks of |d| = 0.11,0.03,0.03,0.01,0.2,0.06,0.02 → W− = rank(0.01) = 1, W+ = 27
    assert out["effect_size_rank_biserial"] == pytest.approx((27 - 1) / 28)
    assert rank_biserial(b, a) == pytest.approx(-(27 - 1) / 28)
    with_nan = paired_wilcoxon([*a, None, math.nan], [*b, 0.5, 0.5])
    assert with_nan["n"] == 7 and with_nan["p_value"] == out["p_value"]
    tie = paired_wilcoxon([0.5, 0.6], [0.5, 0.6])
    assert tie["p_value"] == 1.0 and tie["effect_size_rank_biserial"] == 0.0
    assert paired_wilcoxon([], [])["p_value"] is None
