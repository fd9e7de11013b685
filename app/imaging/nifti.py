"""NIfTI reading and validation: every rejection names the problem, before any data is stored.

The header is checked before a single voxel is decompressed, so a file that claims more voxels
than ``max_voxels`` (a decompression bomb) is refused without reading its payload.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from app.core.errors import Invalid

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")
NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")


@dataclass
class LoadedNifti:
    image: nib.Nifti1Image | nib.Nifti2Image
    data: npt.NDArray[Any]  # 3D, original orientation

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, float, float]:
        zooms = self.image.header.get_zooms()[:3]
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def _sniff(path: Path, what: str) -> None:
    with path.open("rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        raw = gzip.GzipFile(fileobj=fh).read(352) if head == GZIP_MAGIC else fh.read(352)
    if len(raw) < 348:
        raise Invalid(f"{what}: file is too short to be NIfTI ({len(raw)} header bytes)")
    magic344 = raw[344:348]
    magic4 = raw[4:8]
    if magic344 not in NIFTI1_MAGICS and magic4 not in NIFTI2_MAGICS:
        raise Invalid(f"{what}: not a NIfTI-1/2 file (no NIfTI magic in the header)")


def load_nifti(path: Path, what: str, *, max_voxels: int, max_dim: int) -> LoadedNifti:
    """Read and validate a 3D NIfTI (a singleton 4th axis is squeezed)."""
    try:
        _sniff(path, what)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise Invalid(f"{what}: not a readable gzip/NIfTI file ({exc})") from exc
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken headers
        raise Invalid(f"{what}: cannot parse NIfTI header ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise Invalid(f"{what}: not a NIfTI image")

    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise Invalid(f"{what}: image is {len(shape)}D {shape}; a 3D volume is required")
    if len(shape) > 4 or (len(shape) == 4 and shape[3] != 1):
        raise Invalid(f"{what}: image is {len(shape)}D {shape}; only 3D (or 4D with one frame) is accepted")
    shape3 = shape[:3]
    if any(s < 1 for s in shape3):
        raise Invalid(f"{what}: zero-sized dimension in shape {shape3}")
    if any(s > max_dim for s in shape3):
        raise Invalid(f"{what}: dimension above the limit of {max_dim} in shape {shape3}")
    n_voxels = int(np.prod(shape3, dtype=np.int64))
    if n_voxels > max_voxels:
        raise Invalid(f"{what}: {n_voxels} voxels exceed the limit of {max_voxels}")

    dtype = img.header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise Invalid(f"{what}: voxel type {dtype} is not a real numeric type")

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise Invalid(f"{what}: affine has non-finite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise Invalid(f"{what}: affine is singular (zero voxel size or collapsed axes)")

    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise Invalid(f"{what}: voxel data is truncated or corrupt ({exc})") from exc
    if data.ndim == 4:
        data = data[..., 0]
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise Invalid(f"{what}: voxel data contains NaN or infinite values")
    return LoadedNifti(img, data)


def same_geometry(a: npt.ArrayLike, b: npt.ArrayLike, *, atol: float = 1e-3) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0))


def label_dtype(max_value: int) -> np.dtype[Any]:
    return np.dtype(np.uint8) if max_value <= 255 else np.dtype(np.uint16)


def save_label_map(
    labels: npt.NDArray[np.integer[Any]], like: nib.Nifti1Image | nib.Nifti2Image, path: Path
) -> None:
    """Write a label map with ``like``'s affine and header (uint8/uint16 by label range)."""
    dtype = label_dtype(int(labels.max(initial=0)))
    header = like.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(labels.astype(dtype), like.affine, header)
    out.header.set_slope_inter(1, 0)
    out.set_qform(like.affine, code=int(like.header["qform_code"]) or 1)
    out.set_sform(like.affine, code=int(like.header["sform_code"]) or 1)
    nib.save(out, str(path))
