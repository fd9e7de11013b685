"""Crowd simulation from a reference label map (pure numpy/scipy: numpy in, boxes out).

Boxes are drawn per display slice and organ, **one box per connected 2D component** by default
(8-connectivity; components under ``min_component_pixels`` are ignored), as the study's
``bbox.py`` did and as DESIGN.md section 6 recommends; ``per_component=False`` draws one box
around all of the organ's (kept) pixels on the slice. Each annotator independently:

- sees each slice that holds any requested organ with probability ``coverage``;
- on a seen slice, misses each organ with probability ``miss_rate``;
- perturbs every box edge by Gaussian noise with sd ``jitter`` × box width (x edges) or
  × box height (y edges), then clips to the image (a box never collapses below 1 pixel).

Annotator ``i`` draws from ``numpy.random.default_rng([seed, i])``: the same seed gives the
same crowd, and adding annotators leaves the earlier ones unchanged. Coordinates are display
pixels (``app.imaging.coords``), so the SAM engine, the API and the demo share them.
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


@dataclass
class Simulation:
    boxes: list[SimulatedBox] = field(default_factory=list)
    seen: dict[int, list[int]] = field(default_factory=dict)  # annotator index → slices seen


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
) -> Simulation:
    """Simulated crowd boxes for ``label_values`` (name → value in ``canonical_labels``)."""
    height, width = canonical_labels.shape[1], canonical_labels.shape[0]
    truth = reference_boxes(canonical_labels, label_values, per_component=per_component,
                            min_component_pixels=min_component_pixels)
    sim = Simulation()
    for i in range(annotators):
        rng = np.random.default_rng([seed, i])
        seen: list[int] = []
        for k in sorted(truth):
            if rng.random() >= coverage:
                continue
            seen.append(k)
            for label in sorted(truth[k]):
                if rng.random() < miss_rate:
                    continue
                for part, box in enumerate(truth[k][label]):
                    drawn = jitter_box(box, jitter, rng, width, height) if jitter > 0 else box
                    sim.boxes.append(SimulatedBox(i, k, label, drawn, part))
        sim.seen[i] = seen
    return sim
