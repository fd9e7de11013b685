"""Canonical label map → NIfTI on the uploaded image's grid, written atomically to the store.

The mask gets the image's shape, affine and header (``save_label_map``), values are the dataset's
label values, and the gzip stream is deterministic (nibabel writes mtime 0), so the same labels
always give the same bytes — jobs are idempotent down to the file's sha256.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from app.core.hashing import sha256_file
from app.core.storage import Storage
from app.imaging.coords import Orientation
from app.imaging.labelmaps import save_label_map
from app.volumes.models import Volume


def mask_key(volume_id: int, segmentation_id: int) -> str:
    return f"volumes/{volume_id}/segmentations/{segmentation_id}/mask.nii.gz"


def to_original(labels: npt.NDArray[Any], volume: Volume) -> npt.NDArray[Any]:
    """Map a canonical-grid label map back onto the original array's axes."""
    orientation = Orientation.from_affine(volume.affine, volume.shape)
    if tuple(labels.shape) != orientation.canonical_shape:
        raise ValueError(f"label map shape {labels.shape} is not the canonical shape {orientation.canonical_shape}")
    original = orientation.original(labels)
    if tuple(original.shape) != tuple(volume.shape):
        raise ValueError(f"mapped label map shape {original.shape} differs from the image's {tuple(volume.shape)}")
    return np.ascontiguousarray(original)


def write_mask(storage: Storage, volume: Volume, labels: npt.NDArray[Any], key: str) -> str:
    """Write ``labels`` (canonical grid) as ``key`` with the image's geometry; returns the file's sha256.

    The file is complete in a local temp dir before ``put_file`` moves it into place atomically,
    so readers (and a crash at any point) never see a partial mask.
    """
    original = to_original(labels, volume)
    with storage.local_copy(volume.image_key) as image_path:
        image = nib.load(str(image_path))
        assert isinstance(image, nib.Nifti1Image | nib.Nifti2Image)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mask.nii.gz"
            save_label_map(original, image, path)
            digest = sha256_file(path)
            storage.put_file(key, path)
    return digest
