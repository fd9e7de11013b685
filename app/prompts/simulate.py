"""Crowd simulation from a reference label map (pure numpy/scipy: numpy in, boxes out).

Boxes are drawn per display slice and organ, **one box per connected 2D component** by default
(8-connectivity; components under ``min_component_pixels`` are ignored), as the study's
``bbox.py`` did and as DESIGN.md section 6 recommends; ``per_component=False`` draws one box
around all of the organ's (kept) pixels on the slice. Each annotator independently:

- sees each slice that holds any requested organ with probability ``coverage`` (with
  ``organ_free_slices``, every other slice of the volume too — slices with none of the organs,
  where a careful annotator answers "nothing here": a seen slice without boxes);
- on a seen slice, misses each organ with probability ``miss_rate``;
- perturbs every box edge by Gaussian noise with sd ``jitter`` × box width (x edges) or
  × box height (y edges), then clips to the image (a box never collapses below 1 pixel);
- on a seen slice, draws a false-positive box for each requested organ that is *not* on the slice
  (not one voxel of it) with probability ``false_positive_rate``: the organ's box on the nearest slice that has it (the
  organ "continued" past its end), jittered like any box, or a random box when the organ is nowhere
  in the volume. False positives are only ever drawn for organs absent from the slice.

Skill differs between annotators: with ``skill_spread`` > 0 annotator ``i`` has a factor
``f = exp(skill_spread · z)``, z ~ N(0, 1), that multiplies its jitter, miss and false-positive rates
(rates capped at 1). The last ``careless`` annotators of the crowd are careless: they use
``careless_jitter``, ``careless_miss_rate`` and ``careless_false_positive_rate`` (times their ``f``)
instead of the careful values.

Annotator ``i`` draws from ``numpy.random.default_rng([seed, i])``: the same seed gives the
same crowd, and adding annotators leaves the earlier ones unchanged. Organ-free slices and false
positives draw from a second stream ``default_rng([seed, i, 1])`` and the skill factor from a third,
``default_rng([seed, i, 2])``, so with those options off a crowd is exactly what it was before they
existed, and turning them on leaves each annotator's boxes on organ slices as they were (for the same
jitter and miss rate). Coordinates are display pixels (``app.imaging.coords``), so the SAM engine, the
API and the demo share them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from app.imaging.coords import Box, display_slice

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class SimulatedBox:
    annotator: int  # 0-based index in the simulated crowd
    k: int  # display / canonical axial slice
    label: str
    box: Box  # display pixels
    part: int  # component index of this organ on this slice (0 when per_component=False)
    false_positive: bool = False  # drawn for an organ the slice does not hold


@dataclass
class Simulation:
    boxes: list[SimulatedBox] = field(default_factory=list)
    seen: dict[int, list[int]] = field(default_factory=dict)  # annotator index → slices seen
    skills: list[Skill] = field(default_factory=list)  # annotator index → its error rates

    @property
    def careless(self) -> list[int]:
        """Indices of the careless annotators."""
        return [i for i, s in enumerate(self.skills) if s.careless]


def organ_boxes(
    display: npt.NDArray[np.integer[Any]],
    value: int,
    *,
    per_component: bool = True,
    min_component_pixels: int = 1,
) -> list[Box]:
    """Tight display boxes ``[x0, y0, x1, y1)`` of one organ on one display slice."""
    mask = display == value
    if not mask.any():
        return []
    components, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    objects = ndimage.find_objects(components)
    kept = [(i, sl) for i, sl in enumerate(objects, start=1) if sl is not None and sizes[i] >= min_component_pixels]
    boxes = [(float(c.start), float(r.start), float(c.stop), float(r.stop)) for _, (r, c) in kept]
    if per_component or not boxes:
        return boxes
    return [(min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))]


def reference_boxes(
    canonical_labels: npt.NDArray[np.integer[Any]],
    label_values: Mapping[str, int],
    *,
    per_component: bool = True,
    min_component_pixels: int = 1,
) -> dict[int, dict[str, list[Box]]]:
    """Slice k → label → tight display boxes, for every slice holding a requested organ."""
    values = list(label_values.values())
    present = np.flatnonzero(np.isin(canonical_labels, values).any(axis=(0, 1)))
    out: dict[int, dict[str, list[Box]]] = {}
    for k in present:
        display: npt.NDArray[np.integer[Any]] = display_slice(canonical_labels, int(k))  # type: ignore[assignment]
        per_label = {}
        for name in sorted(label_values):
            boxes = organ_boxes(display, label_values[name], per_component=per_component,
                                min_component_pixels=min_component_pixels)
            if boxes:
                per_label[name] = boxes
        if per_label:
            out[int(k)] = per_label
    return out


def jitter_box(box: Box, jitter: float, rng: np.random.Generator, width: int, height: int) -> Box:
    """Gaussian edge noise scaled to the box size, clipped to ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = box
    noise = rng.normal(size=4)
    w, h = x1 - x0, y1 - y0
    x0, x1 = x0 + noise[0] * jitter * w, x1 + noise[2] * jitter * w
    y0, y1 = y0 + noise[1] * jitter * h, y1 + noise[3] * jitter * h
    x0, x1 = _ordered_span(x0, x1, width)
    y0, y1 = _ordered_span(y0, y1, height)
    return (x0, y0, x1, y1)


def _ordered_span(a: float, b: float, limit: int) -> tuple[float, float]:
    lo, hi = min(a, b), max(a, b)
    lo, hi = min(max(lo, 0.0), float(limit)), min(max(hi, 0.0), float(limit))
    if hi - lo < 1.0:  # collapsed by noise or clipping: a 1-pixel span around its centre
        centre = min(max((lo + hi) / 2, 0.5), limit - 0.5)
        lo, hi = centre - 0.5, centre + 0.5
    return float(lo), float(hi)


@dataclass(frozen=True)
class Skill:
    """One simulated annotator's error rates."""

    jitter: float
    miss_rate: float
    false_positive_rate: float
    careless: bool = False


def annotator_skills(
    annotators: int,
    *,
    jitter: float,
    miss_rate: float,
    false_positive_rate: float = 0.0,
    careless: int = 0,
    careless_jitter: float = 0.2,
    careless_miss_rate: float = 0.3,
    careless_false_positive_rate: float = 0.1,
    skill_spread: float = 0.0,
    seed: int = 0,
) -> list[Skill]:
    """Every annotator's :class:`Skill`: the last ``careless`` ones careless, each scaled by its skill factor."""
    if not 0 <= careless <= annotators:
        raise ValueError(f"careless ({careless}) must be between 0 and annotators ({annotators})")
    skills = []
    for i in range(annotators):
        factor = float(np.exp(skill_spread * np.random.default_rng([seed, i, 2]).normal())) if skill_spread > 0 else 1.0
        is_careless = i >= annotators - careless
        base = ((careless_jitter, careless_miss_rate, careless_false_positive_rate) if is_careless
                else (jitter, miss_rate, false_positive_rate))
        skills.append(Skill(jitter=base[0] * factor, miss_rate=min(base[1] * factor, 1.0),
                            false_positive_rate=min(base[2] * factor, 1.0), careless=is_careless))
    return skills


def false_positive_box(
    truth: Mapping[int, Mapping[str, list[Box]]], label: str, k: int, rng: np.random.Generator, width: int, height: int
) -> Box:
    """Where an annotator wrongly boxes ``label`` on slice ``k`` (which does not hold it): the union of the
    organ's boxes on the nearest slice that has it (lower slice on a tie), else a random box of 5-25 % of
    the image's width and height."""
    holding = [j for j in truth if label in truth[j]]
    if holding:
        nearest = min(holding, key=lambda j: (abs(j - k), j))
        boxes = truth[nearest][label]
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    w, h = rng.uniform(0.05, 0.25) * width, rng.uniform(0.05, 0.25) * height
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (float(x0), float(y0), float(x0 + w), float(y0 + h))


def simulate_crowd(
    canonical_labels: npt.NDArray[np.integer[Any]],
    label_values: Mapping[str, int],
    *,
    annotators: int = 3,
    jitter: float = 0.05,
    coverage: float = 0.8,
    miss_rate: float = 0.0,
    seed: int = 0,
    per_component: bool = True,
    min_component_pixels: int = 10,
    organ_free_slices: bool = False,
    false_positive_rate: float = 0.0,
    careless: int = 0,
    careless_jitter: float = 0.2,
    careless_miss_rate: float = 0.3,
    careless_false_positive_rate: float = 0.1,
    skill_spread: float = 0.0,
) -> Simulation:
    """Simulated crowd boxes for ``label_values`` (name → value in ``canonical_labels``)."""
    height, width = canonical_labels.shape[1], canonical_labels.shape[0]
    truth = reference_boxes(canonical_labels, label_values, per_component=per_component,
                            min_component_pixels=min_component_pixels)
    skills = annotator_skills(
        annotators, jitter=jitter, miss_rate=miss_rate, false_positive_rate=false_positive_rate, careless=careless,
        careless_jitter=careless_jitter, careless_miss_rate=careless_miss_rate,
        careless_false_positive_rate=careless_false_positive_rate, skill_spread=skill_spread, seed=seed)
    slices = range(canonical_labels.shape[2]) if organ_free_slices else sorted(truth)
    labels = sorted(label_values)
    absent: dict[str, set[int]] = {}  # label → slices without a single voxel of it (false positives go there)
    if any(s.false_positive_rate > 0 for s in skills):
        for label in labels:
            holds = (canonical_labels == label_values[label]).any(axis=(0, 1))
            absent[label] = {int(k) for k in np.flatnonzero(~holds)}
    sim = Simulation(skills=skills)
    for i, skill in enumerate(skills):
        rng = np.random.default_rng([seed, i])
        extra = np.random.default_rng([seed, i, 1])  # organ-free slices and false positives only
        seen: list[int] = []
        for k in slices:
            present = truth.get(k, {})
            looks = (rng if present else extra).random() < coverage
            if not looks:
                continue
            seen.append(k)
            for label in sorted(present):
                if rng.random() < skill.miss_rate:
                    continue
                for part, box in enumerate(present[label]):
                    drawn = jitter_box(box, skill.jitter, rng, width, height) if skill.jitter > 0 else box
                    sim.boxes.append(SimulatedBox(i, k, label, drawn, part))
            if skill.false_positive_rate <= 0:
                continue
            for label in labels:
                if k not in absent[label] or extra.random() >= skill.false_positive_rate:
                    continue
                box = false_positive_box(truth, label, k, extra, width, height)
                drawn = jitter_box(box, skill.jitter, extra, width, height) if skill.jitter > 0 else box
                sim.boxes.append(SimulatedBox(i, k, label, drawn, 0, false_positive=True))
        sim.seen[i] = seen
    return sim
