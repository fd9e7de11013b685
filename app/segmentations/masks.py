"""Reading finished masks: binary per-label NIfTI and slice overlays (CT + coloured labels).

A finished mask is immutable (its key is written once, atomically, before the row points at it),
so its decoded canonical array is cached by content hash.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import cachetools
import numpy as np
import numpy.typing as npt

from app.core.errors import Invalid
from app.core.labelmaps import open_label_map
from app.core.storage import Storage
from app.datasets.models import Dataset
from app.imaging import dicom_seg
from app.imaging.coords import Orientation, display_slice
from app.imaging.dicom import load_headers
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


# --- DICOM SEG --------------------------------------------------------------------------------
def software_version() -> str:
    try:
        return metadata.version("crowdsam")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class VolumeSource:
    """What a DICOM SEG needs of its volume (plain values: usable after the session has closed)."""

    case_id: str
    sha256: str
    created_at: datetime
    dicom_key: str | None  # the source series' headers (DICOM uploads), else None → synthetic series

    @classmethod
    def of(cls, volume: Volume) -> VolumeSource:
        return cls(volume.case_id, volume.sha256, volume.created_at, volume.dicom_key)


def segmentation_algorithm(row: Segmentation) -> dicom_seg.Algorithm:
    """SAM prompted with crowd boxes: SEMIAUTOMATIC, identified as crowdsam + the model."""
    return dicom_seg.Algorithm(version=software_version(), model=row.model, parameters={"fusion": row.fusion})


def dicom_seg_bytes(
    storage: Storage,
    labels: npt.NDArray[Any],
    affine: npt.ArrayLike,
    values: dict[str, int],
    label_codes: dict[str, Any] | None,
    *,
    source: VolumeSource,
    algorithm: dicom_seg.Algorithm,
    seed: str,
    created: datetime,
) -> bytes:
    """A DICOM SEG of ``labels`` (the volume's NIfTI grid) referencing the volume's source DICOM series,
    or, for a NIfTI upload, a synthetic series seeded by the volume's sha256 (app.imaging.dicom_seg).
    A label to write without a coded concept → 422 naming it."""
    try:
        codes = dicom_seg.resolve_codes(list(dicom_seg.segment_labels(labels, values)), label_codes)
    except dicom_seg.MissingLabelCodes as exc:
        raise Invalid(str(exc)) from exc
    if source.dicom_key is not None:
        with storage.local_copy(source.dicom_key) as path:
            headers = load_headers(path)
    else:
        headers = dicom_seg.synthetic_ct_series(
            affine, labels.shape, seed=f"crowdsam-volume-{source.sha256}", patient_id=source.case_id,
            study_description=f"crowdsam case {source.case_id}", created=source.created_at)
    description = f"crowdsam {algorithm.model or 'reference'}"
    return dicom_seg.build_segmentation(labels, values, codes, headers, algorithm=algorithm, seed=seed,
                                        created=created, series_description=description)


def mask_dicom_seg(storage: Storage, volume: Volume, dataset: Dataset, row: Segmentation,
                   values: dict[str, int]) -> bytes:
    """The finished mask as a DICOM SEG with a segment per label of ``values`` that occurs in it."""
    assert row.mask_key is not None and row.mask_sha256 is not None
    mask = open_label_map(storage, row.mask_key)
    # same mask, labels, codes and software → same UIDs and bytes; any change → new UIDs
    seed = (f"crowdsam-seg-{row.id}-{row.mask_sha256}-{sorted(values.values())}-{dataset.label_codes}"
            f"-{software_version()}")
    return dicom_seg_bytes(storage, mask.labels, mask.image.affine, values, dataset.label_codes,
                           source=VolumeSource.of(volume),
                           algorithm=segmentation_algorithm(row), seed=seed,
                           created=row.finished_at or row.created_at)
