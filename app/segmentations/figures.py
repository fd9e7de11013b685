"""A finished segmentation's montage (GET /segmentations/{id}/figure.png): loads what app.imaging.figures draws.

The boxes drawn are the ones the segmentation used: prompts of its labels on its prompted slices whose
annotator the job listed for that slice and label (``stats.per_slice``). Prompts are stored on display slice
``k`` of the canonical grid in display coordinates — the frame :func:`app.imaging.figures.volume_montage`
draws in — so they are passed through unchanged.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

from sqlalchemy.orm import Session

from app.core.storage import Storage
from app.datasets.repository import DatasetRepository
from app.imaging.figures import FIGURE_VERSION, Mark, canonical_spacing, volume_montage
from app.prompts.reference import canonical_reference
from app.segmentations import masks
from app.segmentations.models import Segmentation
from app.segmentations.repository import SegmentationRepository
from app.volumes import slices
from app.volumes.models import Volume


def figure_etag(row: Segmentation, volume: Volume) -> str:
    """The figure changes with the (immutable) mask, the volume's reference (one may be added later) and the
    drawing code; the boxes are the ones the finished segmentation used."""
    assert row.mask_sha256 is not None
    reference = hashlib.sha256((volume.reference_key or "").encode()).hexdigest()[:8]
    return f'"{row.mask_sha256[:40]}-{reference}-fig{FIGURE_VERSION}"'


def used_marks(prompts: Any, stats: dict[str, Any], labels: dict[str, int]) -> dict[int, list[Mark]]:
    """The prompts (rows with slice_index, label, annotator, kind, x0..y1, positive) the segmentation used,
    by canonical slice; without ``stats.per_slice`` every prompt of its labels on its prompted slices."""
    per_slice: dict[str, Any] = stats.get("per_slice") or {}
    prompted = {int(k) for k in stats.get("prompted_slices") or []}
    out: dict[int, list[Mark]] = defaultdict(list)
    for p in prompts:
        k = int(p.slice_index)
        if p.label not in labels or k not in prompted:
            continue
        if per_slice:
            entry = (per_slice.get(str(k)) or {}).get(p.label) or {}
            if p.annotator not in (entry.get("annotators") or []):
                continue
        if p.kind == "box" and p.x1 is not None and p.y1 is not None:
            coords: tuple[float, ...] = (float(p.x0), float(p.y0), float(p.x1), float(p.y1))
        else:
            coords = (float(p.x0), float(p.y0))
        out[k].append(Mark(p.label, p.annotator, coords, True if p.positive is None else bool(p.positive)))
    return dict(out)


def segmentation_figure(session: Session, storage: Storage, row: Segmentation, volume: Volume) -> bytes:
    """The montage PNG of a finished segmentation (reference contours and Dice bars when the volume has one)."""
    dataset = DatasetRepository(session).get(volume.dataset_id)
    names = row.labels if row.labels is not None else list((row.stats or {}).get("labels") or dataset.labels)
    labels = {n: int(dataset.labels[n]) for n in sorted(names, key=lambda n: dataset.labels.get(n, 0))
              if n in dataset.labels}
    stats = dict(row.stats or {})
    marks = used_marks(SegmentationRepository(session).prompts(volume.id, list(labels)), stats, labels)
    fused = masks.canonical_labels(storage, volume, row)
    reference = canonical_reference(storage, volume) if volume.reference_key is not None else None
    ct = slices.canonical_array(storage, volume.canonical_key)
    return volume_montage(
        ct, fused, reference, marks, labels,
        window=(float(dataset.window_level), float(dataset.window_width)),
        spacing=canonical_spacing(volume.affine, volume.shape, volume.spacing),
        title=f"{volume.case_id} — segmentation {row.id} ({row.model}, {row.fusion})",
        prompted=[int(k) for k in stats.get("prompted_slices") or []],
    )
