"""NIfTI reading and validation: every rejection names the problem, before any data is stored.

The header is checked before a single voxel is decompressed, so a file that claims more voxels
than ``max_voxels`` (a decompression bomb) is refused without reading its payload.

Two ways in: :func:`load_nifti` decodes the whole (scaled) array, as nibabel's ``dataobj`` does;
:func:`read_header` + :func:`read_voxels` keep the voxels as stored (unscaled) and hand them out scaled
in chunks of at most :data:`CHUNK_VOXELS`, so a pass over a volume never holds a second full copy.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener
from nibabel.volumeutils import apply_read_scaling

from app.core.errors import Invalid

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")
NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")
CHUNK_VOXELS = 1 << 20  # voxels per step of a chunked pass: bounds its temporaries (see DESIGN §9 "Upload memory")
READ_BYTES = 1 << 22  # decompressed bytes per gzip read: zlib's output buffer never exceeds this


class _Geometry:
    """Affine and voxel spacing of a NIfTI image's header."""

    image: nib.Nifti1Image | nib.Nifti2Image

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, float, float]:
        zooms = self.image.header.get_zooms()[:3]
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))


@dataclass
class LoadedNifti(_Geometry):
    image: nib.Nifti1Image | nib.Nifti2Image
    data: npt.NDArray[Any]  # 3D, original orientation


@dataclass
class NiftiHeader(_Geometry):
    """A validated header: geometry and voxel type, nothing decoded yet."""

    image: nib.Nifti1Image | nib.Nifti2Image
    what: str
    shape: tuple[int, int, int]  # 3D (a singleton 4th axis dropped)

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def stored_dtype(self) -> np.dtype[Any]:
        """The voxel type in the file (what the header says, before scaling)."""
        return np.dtype(self.image.header.get_data_dtype())

    @property
    def scaling(self) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``(slope, inter)`` exactly as nibabel's ``ArrayProxy`` applies them (``dataobj`` without a dtype)."""
        proxy = _proxy(self.image)
        slope = np.asanyarray(proxy.slope)
        inter = np.asanyarray(proxy.inter)
        if np.can_cast(inter, slope.dtype):
            inter = inter.astype(slope.dtype)
        return slope, inter

    @property
    def scaled(self) -> bool:
        slope, inter = self.scaling
        return bool((slope, inter) != (1, 0))

    @property
    def dtype(self) -> np.dtype[Any]:
        """The voxel type after scaling: what ``np.asanyarray(image.dataobj)`` would return."""
        return np.dtype(self.scale(np.zeros(1, self.stored_dtype)).dtype)

    def scale(self, stored: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Stored values → scaled values, elementwise (any sub-array; the stored array itself when unscaled)."""
        slope, inter = self.scaling
        return np.asarray(apply_read_scaling(stored, cast(Any, slope), cast(Any, inter)))


@dataclass
class Voxels:
    """The voxels of a validated header as stored (unscaled), in the file's (Fortran) order."""

    header: NiftiHeader
    stored: npt.NDArray[Any]  # 3D, original orientation; a copy-on-write memmap for an uncompressed file

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.header.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.header.shape

    def flat(self, array: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """A 1D view of ``array`` (default: the stored voxels) in the stored voxels' memory order."""
        target = self.stored if array is None else array
        view = target.reshape(-1, order=self.order)
        if target.size > 1 and not np.may_share_memory(view, target):
            raise ValueError("not a view: the array's layout differs from the stored voxels'")
        return view

    @property
    def order(self) -> Literal["C", "F"]:
        return "F" if self.stored.flags.f_contiguous else "C"

    def chunks(self, voxels: int | None = None) -> Iterator[tuple[slice, npt.NDArray[Any]]]:
        """``(flat slice, scaled values)`` over all voxels in memory order, ``voxels`` at a time."""
        step = voxels or CHUNK_VOXELS
        flat = self.flat()
        for start in range(0, flat.size, step):
            part = slice(start, min(start + step, flat.size))
            yield part, self.header.scale(flat[part])


def _proxy(image: nib.Nifti1Image | nib.Nifti2Image) -> ArrayProxy:
    proxy = image.dataobj
    if not isinstance(proxy, ArrayProxy):  # nib.load always gives a proxy; an in-memory image has none
        raise TypeError("the image was not loaded from a file")
    return proxy


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


def read_header(path: Path, what: str, *, max_voxels: int, max_dim: int) -> NiftiHeader:
    """Parse and validate a 3D NIfTI header (a singleton 4th axis is allowed); reads no voxel."""
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
    return NiftiHeader(img, what, (shape3[0], shape3[1], shape3[2]))


def _read_stored(header: NiftiHeader) -> npt.NDArray[Any]:
    """The stored (unscaled) array, as ``dataobj.get_unscaled()`` returns it.

    A gzipped file is decompressed straight into the array, ``READ_BYTES`` at a time: nibabel asks
    zlib for the whole remainder at once, which for a very compressible volume (mostly air) makes
    a second buffer of up to ~130 MiB for one 128 KiB block of input. Anything else (an uncompressed
    file is memory-mapped copy-on-write) is left to nibabel.
    """
    proxy = _proxy(header.image)
    if proxy.order != "F":
        return np.asarray(proxy.get_unscaled())
    with ImageOpener(proxy.file_like) as opener:
        fobj = opener.fobj
        if not isinstance(fobj, gzip.GzipFile):
            return np.asarray(proxy.get_unscaled())
        stored = np.empty(proxy.shape, dtype=proxy.dtype, order="F")
        view = stored.T.data.cast("B")  # stored.T is C-contiguous: its bytes are the file's order
        fobj.seek(proxy.offset)
        done = 0
        while done < len(view):
            got = fobj.readinto(view[done: done + READ_BYTES])
            if not got:
                break
            done += got
    if done != len(view):
        raise OSError(f"Expected {len(view)} bytes, got {done} bytes from {proxy.file_like} - is the file damaged?")
    return stored


def _check_finite(header: NiftiHeader, chunks: Iterator[npt.NDArray[Any]]) -> None:
    for chunk in chunks:
        if not np.all(np.isfinite(chunk)):
            raise Invalid(f"{header.what}: voxel data contains NaN or infinite values")


def read_voxels(header: NiftiHeader) -> Voxels:
    """Decode the stored voxels (one array of the stored type) and check them, chunk by chunk."""
    try:
        stored = _read_stored(header)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise Invalid(f"{header.what}: voxel data is truncated or corrupt ({exc})") from exc
    if stored.ndim == 4:
        stored = stored[..., 0]
    voxels = Voxels(header, stored)
    if header.dtype.kind == "f":
        _check_finite(header, (chunk for _, chunk in voxels.chunks()))
    return voxels


def load_nifti(path: Path, what: str, *, max_voxels: int, max_dim: int) -> LoadedNifti:
    """Read and validate a 3D NIfTI (a singleton 4th axis is squeezed), decoded whole and scaled.

    The result equals ``np.asanyarray(img.dataobj)``; prefer :func:`read_voxels` where chunks will do.
    """
    voxels = read_voxels(read_header(path, what, max_voxels=max_voxels, max_dim=max_dim))
    return LoadedNifti(voxels.header.image, voxels.header.scale(voxels.stored))


def same_geometry(a: npt.ArrayLike, b: npt.ArrayLike, *, atol: float = 1e-3) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0))


def label_dtype(max_value: int) -> np.dtype[Any]:
    """The smallest voxel type a label map is written in (see :mod:`app.imaging.labelmaps`)."""
    return np.dtype(np.uint8) if max_value <= 255 else np.dtype(np.uint16)

