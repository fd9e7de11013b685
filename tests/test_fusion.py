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
