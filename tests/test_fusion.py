"""Crowd fusion on synthetic masks with known answers (workers/sam/fusion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.sam import fusion


def _rect(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


A = _rect(2, 10, 2, 10)  # 64 px
B = _rect(4, 12, 4, 12)  # 64 px, overlaps A on 6x6
C = _rect(6, 14, 6, 14)  # 64 px, overlaps B on 6x6, A on 4x4


def test_dice_known_values() -> None:
    assert fusion.dice(A, A) == 1.0
    assert fusion.dice(A, _rect(12, 20, 12, 20)) == 0.0
    assert fusion.dice(A, B) == pytest.approx(2 * 36 / 128)
    empty = np.zeros((3, 3), bool)
    assert fusion.dice(empty, empty, empty=fusion.AGREEMENT_WHEN_BOTH_EMPTY) == 1.0  # agreement's convention
    assert np.isnan(fusion.dice(empty, empty))  # the one Dice's default: nnU-Net's NaN


def test_unite_one_annotators_parts() -> None:
    left, right = _rect(2, 6, 0, 4), _rect(2, 6, 10, 14)
    united = fusion.unite([left, right])
    assert united.sum() == 32 and united[3, 1] and united[3, 11] and not united[3, 7]


def test_majority_is_strictly_more_than_half() -> None:
    fused = fusion.fuse([A, B, C], "majority")
    votes = A.astype(int) + B + C
    assert np.array_equal(fused.mask, votes >= 2)
    # two annotators: a pixel needs both (2 > 1)
    assert np.array_equal(fusion.fuse([A, B], "majority").mask, A & B)
    assert np.array_equal(fusion.fuse([A], "majority").mask, A)


def test_union() -> None:
    assert np.array_equal(fusion.fuse([A, B, C], "union").mask, A | B | C)


def test_staple_known_answers() -> None:
    # identical raters: STAPLE returns their mask
    assert np.array_equal(fusion.fuse([A, A, A], "staple").mask, A)
    # two agreeing raters and one outlier far away: the outlier is voted out
    outlier = _rect(14, 20, 14, 20)
    fused = fusion.fuse([A, A, outlier], "staple")
    assert np.array_equal(fused.mask, A)
    assert fused.agreement == pytest.approx([1.0, 1.0, 0.0])
    # overlapping raters: the consensus core is in, pixels only one rater marked are out
    fused = fusion.fuse([A, B, C], "staple").mask
    assert fused[7, 7] and fused[8, 8]  # all three agree
    assert not fused[2, 2] and not fused[13, 13]  # one rater only
    assert not fusion.fuse([np.zeros((4, 4), bool)] * 3, "staple").mask.any()


def test_agreement_is_dice_with_fused() -> None:
    fused = fusion.fuse([A, B, C], "majority")
    assert fused.agreement == pytest.approx([fusion.dice(m, fused.mask, empty=1.0) for m in (A, B, C)])
    assert fused.agreement[1] > fused.agreement[0]  # the middle rater agrees most with the majority


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown fusion method"):
        fusion.fuse([A], "average")


def test_overlaps_go_to_the_more_confident_label() -> None:
    low, high = np.full((20, 20), 0.6), np.full((20, 20), 0.9)
    out = fusion.resolve_overlaps([A, B], [low, high], [1, 5])
    assert np.all(out[A & B] == 5)
    assert np.all(out[A & ~B] == 1) and np.all(out[B & ~A] == 5)
    assert np.all(out[~(A | B)] == 0)
    # per-pixel: the left half of the overlap prefers label 1
    conf1 = np.where(np.arange(20)[None, :] < 7, 0.95, 0.1) * np.ones((20, 1))
    out = fusion.resolve_overlaps([A, B], [conf1, high], [1, 5])
    assert out[5, 5] == 1 and out[5, 8] == 5
    # ties go to the lower label value
    out = fusion.resolve_overlaps([A, B], [high, high], [1, 5])
    assert np.all(out[A & B] == 1)


def _slice(drawn: dict[str, list[np.ndarray]], label: str = "liver") -> tuple[list[tuple[str, str]], np.ndarray]:
    items = [(label, a) for a in sorted(drawn) for _ in drawn[a]]
    masks = np.stack([m for a in sorted(drawn) for m in drawn[a]])
    return items, masks


@pytest.mark.parametrize("method", ["majority", "staple", "weighted"])
def test_silence_votes_absent(method: str) -> None:
    """One annotator's box where two others saw the slice and drew nothing: no mask; two of three: mask."""
    items, masks = _slice({"a": [A]})
    probs = masks.astype(np.float32) * 0.9
    label_map, stats = fusion.fuse_slice(items, probs, masks, voters=["a", "b", "c"], label_values={"liver": 1},
                                         method=method)
    assert not label_map.any()
    assert stats["liver"]["annotators"] == ["a", "b", "c"] and stats["liver"]["drew"] == ["a"]
    assert stats["liver"]["agreement"] == {"a": 0.0, "b": 1.0, "c": 1.0}  # the silent ones agree with "absent"
    items, masks = _slice({"a": [A], "b": [A]})
    label_map, stats = fusion.fuse_slice(items, masks.astype(np.float32), masks, voters=["a", "b", "c"],
                                         label_values={"liver": 1}, method=method)
    assert np.array_equal(label_map == 1, A)
    assert stats["liver"]["agreement"]["c"] == 0.0 and stats["liver"]["pixels"] == int(A.sum())


def test_union_keeps_a_lone_box_among_silent_voters() -> None:
    items, masks = _slice({"a": [A]})
    label_map, _ = fusion.fuse_slice(items, masks.astype(np.float32), masks, voters=["a", "b", "c"],
                                     label_values={"liver": 1}, method="union")
    assert np.array_equal(label_map == 1, A)


def test_weighted_with_equal_reliability_is_majority() -> None:
    masks = [A, B, C, np.zeros_like(A)]
    same = [(0.85, 0.85)] * 4  # p = q for every voter: the log-odds weights are equal and opposite
    assert np.array_equal(fusion.fuse(masks, "weighted", same).mask, fusion.fuse(masks, "majority").mask)
    assert np.array_equal(fusion.fuse(masks, "weighted").mask, fusion.fuse(masks, "majority").mask)


def test_weighted_trusts_the_reliable_voters() -> None:
    """Two careless voters who mark everything cannot outvote one reliable voter who saw nothing there."""
    everything = np.ones_like(A)
    reliability = [(0.95, 0.98), (0.9, 0.2), (0.9, 0.2)]  # careless: many false positives (low specificity)
    fused = fusion.fuse([np.zeros_like(A), everything, everything], "weighted", reliability)
    assert not fused.mask.any()
    assert fusion.fuse([np.zeros_like(A), everything, everything], "majority").mask.all()
    # ... but where the reliable voter marks the organ, the careless votes add to it
    fused = fusion.fuse([A, everything, everything], "weighted", reliability)
    assert np.array_equal(fused.mask, A)
