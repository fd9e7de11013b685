"""Stage 1 of the engine: the plan — which slices, which decoder prompts, who votes, which cache keys.

Pure bookkeeping, no model: every check on the request happens here, before any encoder or decoder
work, so a bad prompt fails the job at once and nothing is half-computed.

Decoder prompts (:func:`decode_items`): one per box; an annotator's points for a label join the
box that contains them (the study kept only points inside the box). Points inside no box form one
point-only prompt when at least one of them is positive; negative points outside every box say
nothing about any mask and are dropped.

Voters (:class:`SlicePlan.voters`): every annotator who saw the slice — a ``slice_views`` record or
a prompt on it. Each voter votes on every requested label: a box is "present", a view without a
box for that label is "absent" (fusion with negative evidence, :mod:`workers.sam.fusion`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import numpy.typing as npt

from app.core.hashing import sha256_bytes
from app.imaging.coords import display_slice
from workers.sam.cache import make_key
from workers.sam.decode import DecodePrompt
from workers.sam.fusion import FUSION_METHODS

ENGINE_VERSION = "4"  # bump when decoded masks may change (3: absent voters, points join their box;
# 4: a prompt's decoder tokens never depend on the other prompts of its batch)
DERIVED = "~derived"  # the annotator of gap-filling boxes (no token or import name can contain "~")


@dataclass(frozen=True)
class PromptIn:
    annotator: str
    label: str
    kind: Literal["box", "point"]
    coords: tuple[float, ...]  # box (x0, y0, x1, y1) / point (x, y), display pixels of slice k
    positive: bool = True


@dataclass(frozen=True)
class DecodeItem:
    label: str
    annotator: str
    prompt: DecodePrompt


@dataclass(frozen=True)
class ModelIdentity:
    """What makes an embedding or a decoded slice reusable: model, weights and preprocessing."""

    name: str
    weights: str
    prep: str  # the family's preprocessing signature for the window, plus precision


@dataclass(frozen=True)
class SlicePlan:
    k: int
    display: npt.NDArray[np.generic]
    digest: str
    items: tuple[DecodeItem, ...]
    voters: tuple[str, ...]
    embedding_key: str
    decoded_key: str

    @property
    def derived(self) -> bool:
        """A gap-filling slice: its only voter is :data:`DERIVED`."""
        return self.voters == (DERIVED,)


def slice_digest(array: npt.NDArray[np.generic]) -> str:
    data = np.ascontiguousarray(array)
    return sha256_bytes(f"{data.dtype.str}{data.shape}".encode() + data.tobytes())[:32]


def embedding_key(model: ModelIdentity, image_id: str, k: int, digest: str) -> str:
    return make_key(kind="embedding", image=image_id, slice=k, pixels=digest, model=model.name,
                    weights=model.weights, prep=model.prep)


def _prompt_sort_key(p: PromptIn) -> tuple[object, ...]:
    return (p.label, p.annotator, p.kind, tuple(float(c) for c in p.coords), not p.positive)


def validate_prompt(prompt: PromptIn, k: int, label_values: Mapping[str, int]) -> None:
    if prompt.label not in label_values:
        raise ValueError(f"slice {k}: label {prompt.label!r} is not one of {sorted(label_values)}")
    n = 4 if prompt.kind == "box" else 2 if prompt.kind == "point" else -1
    if n < 0:
        raise ValueError(f"slice {k}: prompt kind must be 'box' or 'point', got {prompt.kind!r}")
    if len(prompt.coords) != n or not all(np.isfinite(float(c)) for c in prompt.coords):
        raise ValueError(f"slice {k}: a {prompt.kind} needs {n} finite coordinates, got {prompt.coords!r}")
    if prompt.kind == "box":
        x0, y0, x1, y1 = (float(c) for c in prompt.coords)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"slice {k}: box {prompt.coords!r} is empty (need x0 < x1 and y0 < y1)")


def _inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def decode_items(prompts: Iterable[PromptIn]) -> list[DecodeItem]:
    """Decoder prompts of one slice, in a canonical order (the decode cache key depends on it)."""
    grouped: dict[tuple[str, str], list[PromptIn]] = defaultdict(list)
    for p in sorted(prompts, key=_prompt_sort_key):
        grouped[(p.label, p.annotator)].append(p)
    items: list[DecodeItem] = []
    for (label, annotator), group in sorted(grouped.items()):
        points = [((float(p.coords[0]), float(p.coords[1])), 1 if p.positive else 0)
                  for p in group if p.kind == "point"]
        boxes = [(float(b.coords[0]), float(b.coords[1]), float(b.coords[2]), float(b.coords[3]))
                 for b in group if b.kind == "box"]
        for box in boxes:
            own = [(xy, lab) for xy, lab in points if _inside(xy, box)]
            items.append(DecodeItem(label, annotator, DecodePrompt(
                box, tuple(xy for xy, _ in own), tuple(lab for _, lab in own))))
        loose = [(xy, lab) for xy, lab in points if not any(_inside(xy, box) for box in boxes)]
        if any(lab == 1 for _, lab in loose):
            items.append(DecodeItem(label, annotator, DecodePrompt(
                None, tuple(xy for xy, _ in loose), tuple(lab for _, lab in loose))))
    return items


def _consensus_box(boxes: list[PromptIn]) -> tuple[float, float, float, float]:
    """Median over annotators of each one's enclosing box of a label (one careless box cannot stretch it)."""
    per_annotator: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for b in boxes:
        per_annotator[b.annotator].append(tuple(float(c) for c in b.coords))
    enclosing = np.array([[min(c[0] for c in cs), min(c[1] for c in cs), max(c[2] for c in cs), max(c[3] for c in cs)]
                          for cs in per_annotator.values()])
    x0, y0, x1, y1 = (float(v) for v in np.median(enclosing, axis=0))
    return x0, y0, x1, y1


def gap_prompts(prompts: Mapping[int, list[PromptIn]], views: Mapping[int, Iterable[str]] | None,
                max_gap: int) -> dict[int, list[PromptIn]]:
    """Derived boxes for unknown slices between two prompted slices of the same organ.

    A slice is unknown when nobody prompted or saw it. Between consecutive slices k0 < k1 with boxes
    of a label, at most ``max_gap`` slices apart, each unknown slice gets one box of that label,
    interpolated linearly between the two slices' consensus boxes (:func:`_consensus_box`), drawn by
    :data:`DERIVED` — never a crowd vote.
    """
    known = {k for k, v in prompts.items() if v} | {k for k, v in (views or {}).items() if list(v)}
    by_label: dict[str, dict[int, list[PromptIn]]] = defaultdict(lambda: defaultdict(list))
    for k, given in prompts.items():
        for p in given:
            if p.kind == "box":
                by_label[p.label][int(k)].append(p)
    derived: dict[int, list[PromptIn]] = defaultdict(list)
    for label, slices in sorted(by_label.items()):
        for k0, k1 in pairwise(sorted(slices)):
            if not 1 < k1 - k0 <= max_gap + 1:
                continue
            a, b = np.array(_consensus_box(slices[k0])), np.array(_consensus_box(slices[k1]))
            for k in range(k0 + 1, k1):
                if k in known:
                    continue
                t = (k - k0) / (k1 - k0)
                x0, y0, x1, y1 = (float(v) for v in (1 - t) * a + t * b)
                derived[k].append(PromptIn(DERIVED, label, "box", (x0, y0, x1, y1)))
    return dict(derived)


def plan(canonical: npt.NDArray[np.generic], *, image_id: str, model: ModelIdentity,
         prompts: Mapping[int, list[PromptIn]], label_values: Mapping[str, int], method: str,
         views: Mapping[int, Iterable[str]] | None = None,
         weights: Mapping[str, tuple[float, float]] | None = None, fill_gaps: int = 0) -> list[SlicePlan]:
    """Check the whole request, then one :class:`SlicePlan` per slice with prompts, in slice order.

    ``views``: slice → annotators who saw it (besides those who prompted it); ``weights``: annotator →
    (sensitivity, specificity) for the ``weighted`` fusion; ``fill_gaps``: plan derived boxes for
    unknown slices in gaps of at most that many slices (:func:`gap_prompts`; 0 = off).
    """
    if canonical.ndim != 3:
        raise ValueError(f"canonical volume must be 3D, got shape {canonical.shape}")
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {', '.join(FUSION_METHODS)}")
    n_slices = canonical.shape[2]
    todo = {int(k): list(v) for k, v in prompts.items() if v}
    for k, given in todo.items():
        if not 0 <= k < n_slices:
            raise ValueError(f"slice {k} is outside the volume (0..{n_slices - 1})")
        for p in given:
            validate_prompt(p, k, label_values)
    if fill_gaps > 0:
        todo.update(gap_prompts(todo, views, fill_gaps))
    plans = []
    for k in sorted(todo):
        display = display_slice(canonical, k)
        digest = slice_digest(display)
        items = tuple(decode_items(todo[k]))
        voters = tuple(sorted({p.annotator for p in todo[k]} | set((views or {}).get(k, ()))))
        used = {item.label: int(label_values[item.label]) for item in items}
        slice_weights = {a: list(weights[a]) for a in voters if weights and a in weights}
        decoded_key = make_key(kind="decoded", v=ENGINE_VERSION, image=image_id, slice=k, pixels=digest,
                               model=model.name, weights=model.weights, prep=model.prep, fusion=method,
                               labels=used, voters=voters, reliability=slice_weights,
                               prompts=[[i.label, i.annotator, i.prompt.box, i.prompt.points, i.prompt.point_labels]
                                        for i in items])
        plans.append(SlicePlan(k, display, digest, items, voters,
                               embedding_key(model, image_id, k, digest), decoded_key))
    return plans
