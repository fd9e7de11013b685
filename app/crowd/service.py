"""Annotator reliability of a dataset: votes from the database → Dawid–Skene → per-annotator report."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import cast

import numpy as np
from sqlalchemy.orm import Session

from app.core.storage import Storage
from app.crowd.reliability import ReliabilityEstimate, Vote, estimate, presence_votes
from app.crowd.repository import CrowdRepository
from app.crowd.schemas import AnnotatorOut
from app.datasets.models import Dataset
from app.imaging.metrics import dice
from app.prompts.reference import canonical_reference
from app.prompts.service import display_size
from app.prompts.simulate import reference_boxes

Item = tuple[int, int, str]  # (volume, slice, label)


def dataset_votes(session: Session, dataset: Dataset) -> list[Vote]:
    """Every annotator who saw a slice votes on every label of the dataset (drew it: present)."""
    repo = CrowdRepository(session)
    seen: dict[tuple[int, int], set[str]] = defaultdict(set)
    for volume_id, k, annotator in repo.views(dataset.id):
        seen[(volume_id, k)].add(annotator)
    drew = [((volume_id, k), annotator, label) for volume_id, k, annotator, label, _ in repo.drawn(dataset.id)]
    return presence_votes(seen, drew, dataset.labels)


def dataset_reliability(session: Session, dataset: Dataset) -> ReliabilityEstimate:
    return estimate(dataset_votes(session, dataset))


def fusion_weights(session: Session, dataset: Dataset) -> dict[str, tuple[float, float]]:
    """annotator → (sensitivity, specificity), the weights of ``fusion="weighted"``."""
    estimate_ = dataset_reliability(session, dataset)
    return {name: (a.sensitivity, a.specificity) for name, a in estimate_.annotators.items()}


def annotators(session: Session, storage: Storage, dataset: Dataset) -> list[AnnotatorOut]:
    repo = CrowdRepository(session)
    votes = dataset_votes(session, dataset)
    reliability = estimate(votes)
    slices_seen: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for vote in votes:
        volume_id, k, _ = cast(Item, vote.item)
        slices_seen[vote.annotator].add((volume_id, k))
    boxes: dict[str, int] = defaultdict(int)
    for _v, _k, annotator, label, n in repo.drawn(dataset.id):
        if label in dataset.labels:
            boxes[annotator] += int(n)
    agreement = _consensus_agreement(repo.latest_finished_stats(dataset.id))
    gold = _reference_box_dice(repo, storage, dataset, slices_seen)
    out = []
    for name, est in reliability.annotators.items():
        scores = agreement.get(name, [])
        gold_scores = gold.get(name, [])
        out.append(AnnotatorOut(
            annotator=name, boxes=boxes.get(name, 0), slices_seen=len(slices_seen[name]),
            votes=est.votes, present_votes=est.present_votes,
            sensitivity=round(est.sensitivity, 4), specificity=round(est.specificity, 4),
            agreement=round(float(np.mean(scores)), 4) if scores else None, agreement_items=len(scores),
            reference_box_dice=round(float(np.mean(gold_scores)), 4) if gold_scores else None,
            reference_items=len(gold_scores)))
    return out


def _consensus_agreement(stats: list[dict[str, object]]) -> dict[str, list[float]]:
    """annotator → their Dice with the fused mask, per (slice, label) of the latest segmentations."""
    out: dict[str, list[float]] = defaultdict(list)
    for run in stats:
        per_slice = run.get("per_slice")
        if not isinstance(per_slice, Mapping):
            continue
        for per_label in per_slice.values():
            for label_stats in per_label.values():
                for annotator, score in dict(label_stats.get("agreement") or {}).items():
                    if score is not None:
                        out[annotator].append(float(score))
    return out


def _reference_box_dice(repo: CrowdRepository, storage: Storage, dataset: Dataset,
                        slices_seen: Mapping[str, set[tuple[int, int]]]) -> dict[str, list[float]]:
    """annotator → Dice between their boxes and the reference's tight boxes (rectangles rasterised),
    per (slice, label) they saw on volumes with a reference where either holds the label."""
    out: dict[str, list[float]] = defaultdict(list)
    seen_on: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for annotator, seen in slices_seen.items():
        for volume_id, k in seen:
            seen_on[volume_id].append((annotator, k))
    for volume in repo.reference_volumes(dataset.id):
        if volume.id not in seen_on:
            continue
        reference = reference_boxes(canonical_reference(storage, volume), dataset.labels, per_component=True)
        width, height = display_size(volume)
        drawn: dict[tuple[int, str, str], list[tuple[float, float, float, float]]] = defaultdict(list)
        for k, annotator, label, x0, y0, x1, y1 in repo.boxes(volume.id):
            drawn[(int(k), annotator, label)].append((x0, y0, x1, y1))
        for annotator, k in sorted(seen_on[volume.id]):
            for label in sorted(dataset.labels):
                mine = drawn.get((k, annotator, label), [])
                truth = reference.get(k, {}).get(label, [])
                if mine or truth:
                    out[annotator].append(dice(_raster(mine, width, height), _raster(truth, width, height)))
    return out


def _raster(boxes: list[tuple[float, float, float, float]], width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, int(np.floor(y0))):min(height, int(np.ceil(y1))),
             max(0, int(np.floor(x0))):min(width, int(np.ceil(x1)))] = True
    return mask
