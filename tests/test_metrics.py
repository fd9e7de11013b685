"""Metrics and statistics: nnU-Net conventions, MONAI surface metrics with spacing, Wilcoxon + effect size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from app.evaluations.statistics import json_safe, paired_wilcoxon, rank_biserial
from workers.metrics import (
    PENALIZED,
    evaluate_case,
    hd95_penalty,
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
    assert same == {"NSD": 1.0, "HD95": 0.0, PENALIZED: False}
    shifted_z = np.roll(ref, 1, axis=2)  # one voxel = 3 mm along z
    assert surface(ref, shifted_z, (1.0, 1.0, 3.0), 2.0)["HD95"] == pytest.approx(3.0)
    assert surface(ref, shifted_z, (1.0, 1.0, 3.0), 3.0)["NSD"] == pytest.approx(1.0)
    assert surface(ref, shifted_z, (1.0, 1.0, 3.0), 2.0)["NSD"] < 1.0
    shifted_x = np.roll(ref, 1, axis=0)  # one voxel = 1 mm along x: within 2 mm
    assert surface(ref, shifted_x, (1.0, 1.0, 3.0), 2.0) == {"NSD": 1.0, "HD95": pytest.approx(1.0),
                                                             PENALIZED: False}
    empty = np.zeros_like(ref)
    both = surface(empty, empty, (1, 1, 1), 2.0)
    assert math.isnan(both["NSD"]) and math.isnan(both["HD95"]) and not both[PENALIZED]


def test_missed_and_hallucinated_organs_get_the_hd95_penalty_and_are_counted() -> None:
    """HD95 is undefined when exactly one mask is empty; it gets the field-of-view diagonal (above any real
    HD95 in that image), is flagged, kept in the mean and counted — never dropped. Both empty stays NaN."""
    spacing = (0.8, 0.8, 3.0)
    diagonal = math.sqrt((30 * 0.8) ** 2 + (30 * 0.8) ** 2 + (20 * 3.0) ** 2)
    assert hd95_penalty((30, 30, 20), spacing) == pytest.approx(diagonal)
    ref = cube()
    worst_real = np.zeros_like(ref)  # a prediction at the far corner: the largest HD95 a real contour can get
    worst_real[-2:, -2:, -2:] = True
    assert surface(ref, worst_real, spacing, 2.0)["HD95"] < diagonal
    missed = surface(ref, np.zeros_like(ref), spacing, 2.0)
    hallucinated = surface(np.zeros_like(ref), ref, spacing, 2.0)
    for row in (missed, hallucinated):
        assert row == {"NSD": 0.0, "HD95": pytest.approx(diagonal), PENALIZED: True}

    labels = {"spleen": 1, "liver": 5, "aorta": 52}
    ref_map = np.zeros((30, 30, 20), dtype=np.int32)
    ref_map[cube()] = 1
    ref_map[cube(lo=(20, 20, 2), hi=(25, 25, 6))] = 5
    shifted = np.roll(ref_map, 1, axis=2)  # every organ found, one slice (3 mm) off
    missed_liver = np.where(ref_map == 5, 0, ref_map)
    hallucinated_aorta = ref_map.copy()
    hallucinated_aorta[2:6, 2:6, 14:18] = 52
    cases = [{"case_id": cid, **evaluate_case(ref_map, pred, labels, spacing=spacing)}
             for cid, pred in (("good", shifted), ("miss", missed_liver), ("fp", hallucinated_aorta))]
    assert cases[0]["hd95_penalty_mm"] == pytest.approx(diagonal)
    liver = [c["metrics"]["liver"] for c in cases]
    assert liver[0]["HD95"] == pytest.approx(3.0) and not liver[0][PENALIZED]
    assert liver[1]["HD95"] == pytest.approx(diagonal) and liver[1][PENALIZED] and liver[1]["Dice"] == 0.0
    aorta = [c["metrics"]["aorta"] for c in cases]
    assert math.isnan(aorta[0]["HD95"]) and not aorta[0][PENALIZED]  # both empty: NaN, left out
    assert aorta[2]["HD95"] == pytest.approx(diagonal) and aorta[2][PENALIZED] and aorta[2]["Dice"] == 0.0

    s = summarize(cases, labels)
    # the miss raises the liver's mean HD95 (before: it was NaN and the nanmean left it out → 3.0 or less)
    assert s["mean"]["liver"]["HD95"] == pytest.approx((3.0 + diagonal + liver[2]["HD95"]) / 3)
    assert s["mean"]["aorta"]["HD95"] == pytest.approx(diagonal)  # the hallucination alone; both-empty left out
    assert s["hd95"]["per_label"]["liver"] == {"n": 3, "penalized": 1, "penalized_cases": ["miss"], "both_empty": 0}
    assert s["hd95"]["per_label"]["aorta"] == {"n": 1, "penalized": 1, "penalized_cases": ["fp"], "both_empty": 2}
    assert s["hd95"]["per_label"]["spleen"]["penalized"] == 0
    assert s["hd95"]["penalized"] == 2 and s["hd95"]["n"] == 3 + 1 + 3
    assert PENALIZED not in s["mean"]["liver"]  # a flag, counted, not averaged
    assert json_safe(s)["hd95"]["per_label"]["aorta"]["penalized_cases"] == ["fp"]


def test_case_summary_and_known_slices() -> None:
    from app.imaging.coords import Orientation

    ref = np.zeros((30, 30, 20), dtype=np.int32)
    ref[cube()] = 1
    ref[cube(lo=(20, 20, 2), hi=(25, 25, 6))] = 5
    pred = ref.copy()
    pred[:, :, 5:8] = 0  # slices 5..7 "unprompted": nothing predicted there
    orientation = Orientation.from_affine(np.diag([1.0, 1.0, 3.0, 1.0]), ref.shape)
    prompted = [k for k in range(20) if k not in (5, 6, 7)]
    case = evaluate_case(ref, pred, {"spleen": 1, "liver": 5, "aorta": 52}, spacing=(1, 1, 3),
                         orientation=orientation, known_slices=prompted)
    m = case["metrics"]
    assert case["n_known_slices"] == 17
    assert m["spleen"]["Dice"] == pytest.approx(2 * 4 / (7 + 4))  # 4 of 7 spleen slices kept
    assert m["spleen"]["Dice_known_slices"] == 1.0 and m["spleen"]["slice_dice_mean"] == 1.0
    assert m["liver"]["Dice"] == 2 * 3 / (4 + 3) and m["liver"]["Dice_known_slices"] == 1.0
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
