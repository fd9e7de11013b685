"""Annotator reliability over a whole dataset: Dawid–Skene on per-(slice, label) presence votes.

Every annotator who saw a slice votes on every label of the dataset: 1 = drew a box for it there,
0 = saw the slice and drew none. From all votes of all slices at once, EM estimates each
annotator's sensitivity p (P(vote 1 | organ there)) and specificity q (P(vote 0 | organ absent)),
and the posterior that each item holds the organ (Dawid & Skene 1979, binary case). Estimates are
smoothed by a Beta(α, α) prior so an annotator with few votes stays near an average voter.

Pure numpy, no database: :mod:`app.crowd.service` gathers the votes; the segmentation worker uses
the estimates as fusion weights (:func:`workers.sam.fusion.weighted`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

SMOOTHING = 1.0  # Beta(1, 1) pseudo-counts on p and q
MAX_ITERATIONS = 100
TOLERANCE = 1e-6
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Vote:
    item: Hashable  # e.g. (volume, slice, label)
    annotator: str
    present: bool


@dataclass(frozen=True)
class AnnotatorReliability:
    annotator: str
    votes: int
    present_votes: int
    sensitivity: float
    specificity: float


@dataclass(frozen=True)
class ReliabilityEstimate:
    annotators: dict[str, AnnotatorReliability]
    posterior: dict[Hashable, float]  # item → P(organ there)
    prevalence: float
    iterations: int


def presence_votes(seen: Mapping[K, Iterable[str]], drew: Iterable[tuple[K, str, str]],
                   labels: Iterable[str]) -> list[Vote]:
    """Votes of every annotator who saw a slice on every label: ``seen`` slice → annotators, ``drew``
    (slice, annotator, label) marked present. The vote's item is (*slice, label) (slice a tuple) or
    (slice, label)."""
    names = sorted(set(labels))
    present = set(drew)
    viewers: dict[K, set[str]] = {key: set(people) for key, people in seen.items()}
    for key, annotator, label in present:
        if label in names:
            viewers.setdefault(key, set()).add(annotator)
    return [Vote((*key, label) if isinstance(key, tuple) else (key, label), annotator,
                 (key, annotator, label) in present)
            for key in sorted(viewers, key=repr) for annotator in sorted(viewers[key]) for label in names]


def estimate(votes: Iterable[Vote]) -> ReliabilityEstimate:
    """Dawid–Skene EM, started from the majority vote (soft: share of "present" votes per item)."""
    items: dict[Hashable, int] = {}
    people: dict[str, int] = {}
    rows: list[tuple[int, int, int]] = []
    for vote in votes:
        rows.append((items.setdefault(vote.item, len(items)), people.setdefault(vote.annotator, len(people)),
                     int(vote.present)))
    if not rows:
        return ReliabilityEstimate({}, {}, 0.0, 0)
    data = np.asarray(rows, dtype=np.int64)
    item, who, v = data[:, 0], data[:, 1], data[:, 2].astype(np.float64)
    n_items, n_people = len(items), len(people)
    truth = np.bincount(item, weights=v, minlength=n_items) / np.bincount(item, minlength=n_items)
    iterations = 0
    for iterations in range(1, MAX_ITERATIONS + 1):  # noqa: B007 (the count is reported)
        p, q, prevalence = _m_step(truth, item, who, v, n_people)
        updated = _e_step(p, q, prevalence, item, who, v, n_items)
        change = float(np.max(np.abs(updated - truth)))
        truth = updated
        if change < TOLERANCE:
            break
    p, q, prevalence = _m_step(truth, item, who, v, n_people)
    counts = np.bincount(who, minlength=n_people)
    present = np.bincount(who, weights=v, minlength=n_people)
    annotators = {name: AnnotatorReliability(name, int(counts[i]), int(present[i]), float(p[i]), float(q[i]))
                  for name, i in sorted(people.items())}
    posterior = {key: float(truth[i]) for key, i in items.items()}
    return ReliabilityEstimate(annotators, posterior, float(prevalence), iterations)


Floats = npt.NDArray[np.float64]


def _m_step(truth: Floats, item: npt.NDArray[np.int64], who: npt.NDArray[np.int64], v: Floats,
            n_people: int) -> tuple[Floats, Floats, float]:
    t = truth[item]

    def rate(hits: Floats, trials: Floats) -> Floats:
        a = SMOOTHING
        return (np.bincount(who, weights=hits, minlength=n_people) + a) / (
            np.bincount(who, weights=trials, minlength=n_people) + 2 * a)

    p, q = rate(t * v, t), rate((1 - t) * (1 - v), 1 - t)
    a = SMOOTHING
    prevalence = float(np.clip((truth.sum() + a) / (len(truth) + 2 * a), 1e-6, 1 - 1e-6))
    return p, q, prevalence


def _e_step(p: npt.NDArray[np.float64], q: npt.NDArray[np.float64], prevalence: float, item: npt.NDArray[np.int64],
            who: npt.NDArray[np.int64], v: npt.NDArray[np.float64], n_items: int) -> npt.NDArray[np.float64]:
    there = v * np.log(p[who]) + (1 - v) * np.log(1 - p[who])
    absent = v * np.log(1 - q[who]) + (1 - v) * np.log(q[who])
    log_odds = (np.log(prevalence / (1 - prevalence))
                + np.bincount(item, weights=there - absent, minlength=n_items))
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(log_odds, -500, 500))), dtype=np.float64)
