"""DICOM CT series → NIfTI, the way SimpleITK's ``ImageSeriesReader`` + ``WriteImage`` would write it.

Everything is checked from the headers (read with ``stop_before_pixels``) before a pixel is decoded:
one series, CT, single-frame grayscale slices of one size, pixel spacing and orientation, positions
along the slice normal evenly spaced (no gap, no duplicate, no tilt), and the voxel budget. Then the
slices are decoded one at a time, sorted along the normal ``n = row × column`` (as GDCM's IPP sorter
does), and written as a NIfTI whose voxel (i, j, k) is column i, row j of slice k; its affine is the
series' LPS geometry turned into RAS. Values are ``stored × RescaleSlope + RescaleIntercept``: int16 when
every value is integral and fits, else float32.

The source headers (pixel data removed) are kept as a zip of ``{k:05d}.dcm`` files (see
:func:`load_headers`), so derived objects such as DICOM SEG can reference the source slices.
"""

from __future__ import annotations

import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from app.core.errors import Invalid, PayloadTooLarge

ZIP_MAGIC = b"PK\x03\x04"
DICOM_MAGIC = b"DICM"  # at byte 128, after the preamble
MAX_FILES = 10_000  # slices (or zip members) of one series
COPY_BYTES = 1 << 20
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOMDIR_UID = "1.2.840.10008.1.3.10"
ORIENTATION_TOL = 1e-4  # direction cosines
POSITION_TOL_MM = 1e-2  # in-plane drift of slice origins, and duplicate positions
SPACING_REL_TOL = 1e-2  # slice gaps may differ from the mean by this share
BYTES_PER_VOXEL = 6  # the conversion's peak: an int16 array and its float32 copy


@dataclass(frozen=True)
class SeriesInfo:
    """What the converted volume keeps of its source series."""

    study_instance_uid: str | None
    series_instance_uid: str
    frame_of_reference_uid: str | None
    n_slices: int
    shape: tuple[int, int, int]


def is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == ZIP_MAGIC


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble."""
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == DICOM_MAGIC


# --- zip -------------------------------------------------------------------------------------------
def _unsafe_name(name: str) -> bool:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in PurePosixPath(name.replace("\\", "/")).parts


def _skipped_name(name: str) -> bool:
    """Clutter that archivers add (macOS resource forks, hidden files, DICOMDIR is checked by content)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


def extract_zip(
    archive: Path, directory: Path, *, max_bytes: int, max_files: int = MAX_FILES
) -> list[tuple[Path, str]]:
    """Unpack the files of ``archive`` into ``directory`` under numbered names; 422 for unsafe members.

    Refused: absolute names, ``..``, links, more than ``max_files`` members; more than ``max_bytes``
    decompressed in all → 413 (counted while decompressing, not only as the archive claims).
    Returns (local file, name in the archive).
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > max_files:
                raise Invalid(f"image: the zip has {len(infos)} members, more than the limit of {max_files}")
            taken: list[zipfile.ZipInfo] = []
            for info in infos:
                if _unsafe_name(info.filename):
                    raise Invalid(f"image: unsafe member name {info.filename!r} in the zip (absolute or '..')")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise Invalid(f"image: member {info.filename!r} of the zip is a symbolic link")
                if info.is_dir() or _skipped_name(info.filename):
                    continue
                taken.append(info)
            if sum(i.file_size for i in taken) > max_bytes:
                raise PayloadTooLarge(f"image: the unpacked zip exceeds {max_bytes} bytes (CROWDSAM_MAX_UPLOAD_BYTES)")
            out: list[tuple[Path, str]] = []
            left = max_bytes
            for n, info in enumerate(taken):
                target = directory / f"{n:06d}"
                with zf.open(info) as src, target.open("wb") as dst:
                    while chunk := src.read(COPY_BYTES):
                        left -= len(chunk)
                        if left < 0:
                            raise PayloadTooLarge(
                                f"image: the unpacked zip exceeds {max_bytes} bytes (CROWDSAM_MAX_UPLOAD_BYTES)"
                            )
                        dst.write(chunk)
                out.append((target, info.filename))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError) as exc:
        raise Invalid(f"image: the zip is corrupt or unsupported ({type(exc).__name__}: {exc})") from exc
    if not out:
        raise Invalid("image: the zip holds no files")
    return out


# --- headers ---------------------------------------------------------------------------------------
@dataclass
class _Slice:
    path: Path
    name: str
    header: Dataset
    position: npt.NDArray[np.float64]


def _floats(ds: Dataset, keyword: str, n: int, name: str) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (n,) or not np.all(np.isfinite(out)):
        raise Invalid(f"image: {name}: {keyword} is missing or not {n} numbers")
    return out


def _read_headers(files: list[tuple[Path, str]]) -> list[_Slice]:
    slices: list[_Slice] = []
    for path, name in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for damaged files
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the server's disk, not the file
            raise Invalid(f"image: {name!r} is not a DICOM file ({exc})") from exc
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_UID:
            continue  # an index of the files, not a slice
        slices.append(_Slice(path, name, ds, np.zeros(3)))
    if not slices:
        raise Invalid("image: no DICOM slices found")
    return slices


def _same(slices: list[_Slice], keyword: str, what: str) -> Any:
    values = {str(s.header.get(keyword)) for s in slices}
    if len(values) > 1:
        raise Invalid(f"image: the slices differ in {what} ({keyword}: {sorted(values)[:5]})")
    return slices[0].header.get(keyword)


def _validate(slices: list[_Slice], *, max_voxels: int, max_dim: int, memory_budget: int) -> tuple[
    list[_Slice], npt.NDArray[np.float64], tuple[float, float, float]
]:
    """Check the series from its headers; return the slices sorted along the normal, LPS direction and spacing."""
    series = {str(s.header.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise Invalid(f"image: the files belong to {len(series)} different series (SeriesInstanceUID); "
                      "upload one series per volume")
    if "" in series:
        raise Invalid("image: SeriesInstanceUID is missing")
    modalities = {str(s.header.get("Modality", "")) for s in slices}
    if modalities != {"CT"}:
        raise Invalid(f"image: modality {sorted(modalities)} is not CT (Modality must be 'CT')")
    for s in slices:
        frames = s.header.get("NumberOfFrames")
        if frames is not None and int(frames) > 1:
            raise Invalid(f"image: {s.name!r} is a multi-frame image; only single-frame CT slices are accepted")
        if int(s.header.get("SamplesPerPixel", 1)) != 1 or str(
            s.header.get("PhotometricInterpretation", "MONOCHROME2")
        ) not in ("MONOCHROME1", "MONOCHROME2"):
            raise Invalid(f"image: {s.name!r} is not a grayscale image")
    if len(slices) < 2:
        raise Invalid("image: a single DICOM slice is not a volume; upload the whole series")
    if len(slices) > max_dim:
        raise Invalid(f"image: {len(slices)} slices exceed the dimension limit of {max_dim}")
    rows, cols = _same(slices, "Rows", "size"), _same(slices, "Columns", "size")
    if rows is None or cols is None or int(rows) < 1 or int(cols) < 1:
        raise Invalid("image: Rows/Columns are missing")
    rows, cols = int(rows), int(cols)
    if max(rows, cols) > max_dim:
        raise Invalid(f"image: slice size {cols}×{rows} exceeds the dimension limit of {max_dim}")
    n_voxels = rows * cols * len(slices)
    if n_voxels > max_voxels:
        raise Invalid(f"image: {n_voxels} voxels exceed the limit of {max_voxels}")
    # Worst case: int16 voxels turned float32 part-way (a value that is fractional or does not fit int16).
    need = n_voxels * BYTES_PER_VOXEL
    if need > memory_budget:
        raise PayloadTooLarge(f"image: {cols}×{rows}×{len(slices)} voxels need up to {need >> 20} MiB, above the "
                              f"per-upload memory budget of {memory_budget >> 20} MiB (CROWDSAM_UPLOAD_MEMORY_BYTES)")
    for keyword, what in (("BitsAllocated", "bit depth"), ("PixelRepresentation", "pixel sign")):
        _same(slices, keyword, what)

    first = slices[0]
    orientation = _floats(first.header, "ImageOrientationPatient", 6, first.name)
    spacing_rc = _floats(first.header, "PixelSpacing", 2, first.name)
    for s in slices[1:]:
        if not np.allclose(_floats(s.header, "ImageOrientationPatient", 6, s.name), orientation,
                           atol=ORIENTATION_TOL):
            raise Invalid(f"image: {s.name!r} has a different ImageOrientationPatient; the slices are not parallel")
        if not np.allclose(_floats(s.header, "PixelSpacing", 2, s.name), spacing_rc, atol=1e-6, rtol=1e-6):
            raise Invalid(f"image: {s.name!r} has a different PixelSpacing")
    if np.any(spacing_rc <= 0):
        raise Invalid("image: PixelSpacing must be positive")
    row, col = orientation[:3], orientation[3:]
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3):
        raise Invalid("image: ImageOrientationPatient is not two orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)

    for s in slices:
        s.position = _floats(s.header, "ImagePositionPatient", 3, s.name)
    slices.sort(key=lambda s: float(s.position @ normal))
    along = np.array([s.position @ normal for s in slices])
    steps = np.diff(along)
    if np.any(steps < POSITION_TOL_MM):
        k = int(np.argmin(steps))
        raise Invalid(f"image: {slices[k].name!r} and {slices[k + 1].name!r} lie at the same position "
                      "(duplicate slices)")
    mean = (along[-1] - along[0]) / (len(slices) - 1)
    worst = int(np.argmax(np.abs(steps - mean)))
    if abs(steps[worst] - mean) > SPACING_REL_TOL * mean:
        raise Invalid(f"image: uneven slice spacing ({steps[worst]:.3f} mm between {slices[worst].name!r} and "
                      f"{slices[worst + 1].name!r}, {mean:.3f} mm on average): a slice is missing or the series "
                      "is not uniformly sampled")
    drift = np.array([(s.position - slices[0].position) @ axis for s in slices for axis in (row, col)])
    if np.max(np.abs(drift)) > max(POSITION_TOL_MM, 1e-3 * mean * len(slices)):
        raise Invalid("image: the slice origins do not line up along the slice normal (tilted or sheared stack); "
                      "only stacks of parallel slices perpendicular to their spacing are accepted")
    direction = np.stack([row, col, normal], axis=1)
    return slices, direction, (float(spacing_rc[1]), float(spacing_rc[0]), float(mean))


# --- pixels ----------------------------------------------------------------------------------------
def _slice_values(ds: Dataset, name: str, shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise Invalid(f"image: cannot decode the pixels of {name!r} (transfer syntax {syntax}: {exc})") from exc
    if stored.shape != shape:
        raise Invalid(f"image: {name!r} pixel data has shape {stored.shape}, not Rows×Columns {shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values: npt.NDArray[np.float64] = stored.astype(np.float64) * slope + intercept
    return values


def read_series(files: list[tuple[Path, str]], nifti_path: Path, headers_zip: Path, *, max_voxels: int,
                max_dim: int, memory_budget: int) -> SeriesInfo:
    """Validate the DICOM files of one CT series and write it as a NIfTI (and its headers as a zip)."""
    headers = _read_headers(files)
    try:
        slices, direction, spacing = _validate(
            headers, max_voxels=max_voxels, max_dim=max_dim, memory_budget=memory_budget
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a malformed attribute value
        raise Invalid(f"image: malformed DICOM attribute ({type(exc).__name__}: {exc})") from exc
    rows, cols = int(slices[0].header.Rows), int(slices[0].header.Columns)
    out: npt.NDArray[Any] = np.zeros((cols, rows, len(slices)), dtype=np.int16, order="F")
    tmp_zip = headers_zip.with_suffix(".part")
    with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, s in enumerate(slices):
            try:
                ds = pydicom.dcmread(s.path)
            except Exception as exc:  # pydicom raises many types for damaged files
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise
                raise Invalid(f"image: {s.name!r} is truncated or corrupt ({exc})") from exc
            values = _slice_values(ds, s.name, (rows, cols))
            if not np.all(np.isfinite(values)):
                raise Invalid(f"image: {s.name!r} has non-finite values after rescaling")
            if out.dtype == np.int16 and not (
                np.all(values == np.round(values)) and values.min() >= -32768 and values.max() <= 32767
            ):
                out = out.astype(np.float32, order="F")
            out[:, :, k] = values.T
            for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if keyword in ds:
                    delattr(ds, keyword)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=False)
            zf.writestr(f"{k:05d}.dcm", buffer.getvalue())
    tmp_zip.replace(headers_zip)

    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    affine[:3, 3] = slices[0].position
    affine = LPS_TO_RAS @ affine
    image = nib.Nifti1Image(out, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.to_filename(str(nifti_path))
    first = slices[0].header
    return SeriesInfo(
        study_instance_uid=_uid(first, "StudyInstanceUID"),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=_uid(first, "FrameOfReferenceUID"),
        n_slices=len(slices),
        shape=(cols, rows, len(slices)),
    )


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value)[:64] if value else None


def load_headers(zip_path: Path) -> list[Dataset]:
    """The source series' datasets without pixel data, ordered by k (the stored NIfTI's third axis)."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".dcm"))
        return [pydicom.dcmread(io.BytesIO(zf.read(n))) for n in names]
