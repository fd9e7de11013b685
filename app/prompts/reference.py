"""A volume's reference label map on the canonical grid, and the slices that contain anatomy."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

from app.core.errors import Invalid
from app.core.labelmaps import load_label_map
from app.core.redis import get_redis
from app.core.storage import Storage
from app.imaging.coords import Orientation
from app.volumes.models import Volume


def canonical_reference(storage: Storage, volume: Volume) -> npt.NDArray[np.int32]:
    """The reference (dataset label values) as a canonical RAS+ array; 422 when there is none."""
    if volume.reference_key is None:
        raise Invalid(f"volume {volume.id} has no reference label map")
    data = load_label_map(storage, volume.reference_key)
    orientation = Orientation.from_affine(volume.affine, volume.shape)
    return np.ascontiguousarray(orientation.canonical(data), dtype=np.int32)


def slices_with_labels(canonical_ref: npt.NDArray[np.integer[Any]], values: list[int] | None = None) -> list[int]:
    """Canonical k whose axial slice holds any of ``values`` (any label when None)."""
    mask = canonical_ref > 0 if values is None else np.isin(canonical_ref, values)
    return [int(k) for k in np.flatnonzero(mask.any(axis=(0, 1)))]


def interest_slices(storage: Storage, volume: Volume) -> list[int]:
    """Slices worth showing annotators: those with reference anatomy, or all slices without a reference.

    Cached in Redis per reference file (computing it reads the whole label map).
    """
    if volume.reference_key is None:
        return list(range(volume.n_slices))
    key = f"crowdsam:interest:{volume.id}:{volume.sha256[:16]}:{volume.reference_key}"
    redis = get_redis()
    cached = redis.get(key)
    if cached is not None:
        return [int(k) for k in json.loads(cached)]
    slices = slices_with_labels(canonical_reference(storage, volume))
    redis.set(key, json.dumps(slices), ex=7 * 24 * 3600)
    return slices
