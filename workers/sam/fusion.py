"""Crowd fusion on one slice and one label: unite each annotator's masks, then fuse annotators.

Methods: ``majority`` (a pixel is in when more than half of the annotators have it), ``staple``
(SimpleITK STAPLE, posterior > 0.5) and ``union``. Agreement of an annotator = Dice of their mask
with the fused mask (app.imaging.metrics.dice; 1.0 when both are empty: an annotator who drew
nothing where the fusion has nothing agrees fully, unlike nnU-Net's NaN for scoring). Overlaps
between labels go to the label whose model probability is highest at the pixel (ties: the lower
label value).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.imaging.metrics import dice

FUSION_METHODS = ("majority", "staple", "union")

Mask = npt.NDArray[np.bool_]
AGREEMENT_WHEN_BOTH_EMPTY = 1.0


@dataclass(frozen=True)
class Fused:
    mask: Mask
    agreement: list[float]  # one Dice per input mask, in input order


def unite(masks: Sequence[Mask]) -> Mask:
    """One annotator's boxes (e.g. one per connected part of an organ) → one mask."""
    if not masks:
        raise ValueError("unite needs at least one mask")
    return np.logical_or.reduce([np.asarray(m, dtype=bool) for m in masks])


def majority(masks: Sequence[Mask]) -> Mask:
    votes = np.sum([np.asarray(m, dtype=np.int32) for m in masks], axis=0)
    return np.asarray(votes * 2 > len(masks))


def union(masks: Sequence[Mask]) -> Mask:
    return unite(masks)


def staple(masks: Sequence[Mask], threshold: float = 0.5) -> Mask:
    """SimpleITK's STAPLE (binary, foreground 1): posterior probability > ``threshold``."""
    import SimpleITK as sitk

    if len(masks) == 1:
        return np.asarray(masks[0], dtype=bool).copy()
    stack = [np.asarray(m, dtype=bool) for m in masks]
    if all(not m.any() for m in stack):
        return np.zeros_like(stack[0])
    if all(np.array_equal(stack[0], m) for m in stack[1:]):
        return stack[0].copy()
    images = [sitk.GetImageFromArray(m.astype(np.uint8)) for m in stack]
    posterior = sitk.GetArrayFromImage(sitk.STAPLE(images, 1.0))
    return np.asarray(posterior > threshold)


def fuse(masks: Sequence[Mask], method: str = "majority") -> Fused:
    """Fuse one mask per annotator; the agreement of each annotator with the result."""
    if not masks:
        raise ValueError("fuse needs at least one mask")
    if method == "majority":
        fused = majority(masks)
    elif method == "staple":
        fused = staple(masks)
    elif method == "union":
        fused = union(masks)
    else:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {', '.join(FUSION_METHODS)}")
    return Fused(fused, [dice(np.asarray(m, dtype=bool), fused, empty=AGREEMENT_WHEN_BOTH_EMPTY) for m in masks])


def resolve_overlaps(masks: Sequence[Mask], confidence: Sequence[npt.NDArray[np.floating]],
                     values: Sequence[int]) -> npt.NDArray[np.int64]:
    """Label map from per-label masks: a pixel claimed by several labels goes to the most confident one.

    ``masks``/``confidence``/``values`` are parallel; ``values`` must be sorted ascending so ties go
    to the lower label value (``argmax`` keeps the first maximum).
    """
    if not masks:
        raise ValueError("resolve_overlaps needs at least one label")
    claimed = np.stack([np.asarray(m, dtype=bool) for m in masks])
    scores = np.where(claimed, np.stack([np.asarray(c, dtype=np.float64) for c in confidence]), -1.0)
    winner = np.argmax(scores, axis=0)
    out = np.asarray(values, dtype=np.int64)[winner]
    out[~claimed.any(axis=0)] = 0
    return out
