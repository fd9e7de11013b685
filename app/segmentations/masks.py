"""Reading finished masks: binary per-label NIfTI and slice overlays (CT + coloured labels).

A finished mask is immutable (its key is written once, atomically, before the row points at it),
so its decoded canonical array is cached by content hash.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

import cachetools
import numpy as np
import numpy.typing as npt

from app.core.errors import Invalid
from app.core.labelmaps import open_label_map
from app.core.storage import Storage
from app.imaging.coords import Orientation, display_slice
from app.imaging.labelmaps import save_label_map
from app.imaging.palette import label_color
from app.imaging.render import png_bytes, window_to_uint8
from app.segmentations.models import Segmentation
from app.volumes.models import Volume

_CACHE_SIZE = 8
_cache: cachetools.LRUCache[str, npt.NDArray[Any]] = cachetools.LRUCache(maxsize=_CACHE_SIZE)
_lock = threading.Condition()  # the review page asks for many slices at once: one decode per mask
OVERLAY_ALPHA = 0.45


def binary_mask_nifti(storage: Storage, row: Segmentation, value: int) -> bytes:
    """``.nii.gz`` bytes of ``mask == value`` (uint8 0/1) with the mask's (= the image's) geometry."""
    assert row.mask_key is not None
    mask = open_label_map(storage, row.mask_key)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mask.nii.gz"
        save_label_map((mask.labels == value).astype(np.uint8), mask.image, path)
        return path.read_bytes()


def _mask_digest(storage: Storage, volume: Volume, row: Segmentation) -> str:
    assert row.mask_key is not None and row.mask_sha256 is not None
    return row.mask_sha256


@cachetools.cached(_cache, key=_mask_digest, condition=_lock)
def canonical_labels(storage: Storage, volume: Volume, row: Segmentation) -> npt.NDArray[Any]:
    """The finished label map on the canonical grid (cached by the mask's sha256)."""
    assert row.mask_key is not None
    data = open_label_map(storage, row.mask_key).labels
    return Orientation.from_affine(volume.affine, volume.shape).canonical(data)


def parse_label_filter(raw: str | None, labels: dict[str, int]) -> dict[str, int]:
    """``"liver,spleen"`` → {name: value}; None/empty → every label."""
    if raw is None or not raw.strip():
        return dict(labels)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise Invalid(f"labels {unknown} are not labels of this dataset (has: {sorted(labels)})")
    return {n: labels[n] for n in names}


def overlay_png(
    ct_canonical: npt.NDArray[Any],
    labels_canonical: npt.NDArray[Any],
    k: int,
    values: list[int],
    *,
    mode: str,
    level: float,
    width: float,
) -> bytes:
    """Display slice ``k``: ``mode="overlay"`` → RGB CT with labels blended in;
    ``mode="mask"`` → RGBA, label colours opaque, everything else transparent."""
    mask = np.asarray(display_slice(labels_canonical, k))
    if mode == "mask":
        rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
        for value in values:
            where = mask == value
            rgba[where, :3] = label_color(value)
            rgba[where, 3] = 255
        return png_bytes(rgba)
    gray = window_to_uint8(np.asarray(display_slice(ct_canonical, k)), level, width)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for value in values:
        where = mask == value
        rgb[where] = (1 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * np.asarray(label_color(value), np.float32)
    return png_bytes(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
