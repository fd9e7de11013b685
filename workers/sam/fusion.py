"""Crowd fusion on one slice: unite each annotator's masks, fuse annotators per label, resolve overlaps.

Every annotator who saw the slice votes on every label: an annotator who drew no box for a label
there votes "absent" with an empty mask (negative evidence), so one false-positive box among three
viewers does not survive a majority vote.

Methods: ``majority`` (a pixel is in when more than half of the voters have it), ``staple``
(SimpleITK STAPLE, posterior > 0.5), ``weighted`` (each voter's vote weighted by their
sensitivity p and specificity q estimated over the whole dataset, :mod:`app.crowd.reliability`:
a pixel is in when ``sum(log p/(1-q) for "in" votes) + sum(log (1-p)/q for "out" votes) > 0``, the
Dawid–Skene posterior with a flat prior; equal p = q for all voters is exactly ``majority``)
and ``union``. Agreement of an annotator = Dice of their mask
with the fused mask (app.imaging.metrics.dice; 1.0 when both are empty: an annotator who drew
nothing where the fusion has nothing agrees fully, unlike nnU-Net's NaN for scoring). Overlaps
between labels go to the label whose model probability is highest at the pixel (ties: the lower
label value).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.imaging.metrics import dice

FUSION_METHODS = ("majority", "staple", "weighted", "union")
RELIABILITY_BOUNDS = (0.01, 0.99)  # a voter is never taken as perfectly right or wrong
Reliability = tuple[float, float]  # (sensitivity, specificity)
TIE = 1e-9  # log-odds this close to 0 are a tie, whatever the float rounding
UNKNOWN_RELIABILITY: Reliability = (0.8, 0.8)  # a voter the estimate has not seen: an average voter

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


def weighted(masks: Sequence[Mask], reliability: Sequence[Reliability]) -> Mask:
    """Dawid–Skene vote with known (sensitivity, specificity) per voter and a flat prior."""
    low, high = RELIABILITY_BOUNDS
    score = np.zeros(np.shape(masks[0]), dtype=np.float64)
    for mask, (sensitivity, specificity) in zip(masks, reliability, strict=True):
        p, q = float(np.clip(sensitivity, low, high)), float(np.clip(specificity, low, high))
        score += np.where(np.asarray(mask, dtype=bool), np.log(p / (1 - q)), np.log((1 - p) / q))
    return np.asarray(score > TIE)  # a tie (equal and opposite weights) is out, like majority's


def fuse(masks: Sequence[Mask], method: str = "majority", reliability: Sequence[Reliability] | None = None) -> Fused:
    """Fuse one mask per voter; the agreement of each voter with the result.

    ``reliability`` (one (sensitivity, specificity) per mask) is used by ``weighted`` only; without
    it ``weighted`` is ``majority``.
    """
    if not masks:
        raise ValueError("fuse needs at least one mask")
    if method == "majority" or (method == "weighted" and reliability is None):
        fused = majority(masks)
    elif method == "weighted":
        assert reliability is not None
        fused = weighted(masks, reliability)
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


def fuse_slice(items: Sequence[tuple[str, str]], probs: npt.NDArray[np.float32], masks: npt.NDArray[np.bool_], *,
               voters: Sequence[str], label_values: Mapping[str, int], method: str,
               reliability: Mapping[str, Reliability] | None = None,
               ) -> tuple[npt.NDArray[np.int64], dict[str, dict[str, object]]]:
    """All decoded prompts of one slice → its label map and per-label stats.

    ``items[i]`` = (label, annotator) of decoded mask ``masks[i]``. Per label: each voter's masks
    united (empty when they drew nothing for it), voters fused, then overlaps resolved by the mean
    model probability of the annotators who drew the label.
    """
    by_label: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, (label, annotator) in enumerate(items):
        by_label[label][annotator].append(index)
    shape = masks.shape[1:]
    labels = sorted(by_label, key=lambda name: (label_values[name], name))
    fused_masks, confidences = [], []
    stats: dict[str, dict[str, object]] = {}
    for label in labels:
        drew = by_label[label]
        everyone = sorted(set(voters) | set(drew))
        own_masks = [unite([masks[i] for i in drew[a]]) if a in drew else np.zeros(shape, dtype=bool)
                     for a in everyone]
        weights = None
        if reliability is not None:
            weights = [reliability.get(a, UNKNOWN_RELIABILITY) for a in everyone]
        fused = fuse(own_masks, method, weights)
        fused_masks.append(fused.mask)
        confidences.append(np.mean([np.max(probs[drew[a]], axis=0) for a in sorted(drew)], axis=0))
        stats[label] = {"annotators": everyone, "drew": sorted(drew),
                        "agreement": {a: float(d) for a, d in zip(everyone, fused.agreement, strict=True)}}
    label_map = resolve_overlaps(fused_masks, confidences, [label_values[name] for name in labels])
    for label, confidence in zip(labels, confidences, strict=True):
        final = label_map == label_values[label]
        stats[label]["score"] = float(confidence[final].mean()) if final.any() else 0.0
        stats[label]["pixels"] = int(final.sum())
    return label_map, stats
