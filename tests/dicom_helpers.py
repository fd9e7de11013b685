"""Write DICOM CT series from NIfTI volumes for tests (pydicom; CT Image Storage, one file per slice).

``orientation`` names where the slice axes point, as nibabel axis codes of (row direction, column
direction, slice order): ``("L", "P", "S")`` is the usual axial series; any permutation with flips works
(e.g. ``("P", "L", "I")``, or a sagittal acquisition ``("P", "I", "L")``). Values are written as
``stored = (value - intercept) / slope`` in int16 or uint16.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ds(values: Any) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def reorient(array: npt.NDArray[Any], affine: npt.NDArray[Any], codes: tuple[str, str, str]) -> tuple[
    npt.NDArray[Any], npt.NDArray[np.float64]
]:
    """The same voxels on axes pointing to ``codes`` (nibabel codes), with the matching affine."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes)
    )
    out = nib.orientations.apply_orientation(array, transform)
    return out, affine @ nib.orientations.inv_ornt_aff(transform, array.shape)


def write_series(
    source: Path | tuple[npt.NDArray[Any], npt.NDArray[Any]],
    out_dir: Path,
    *,
    orientation: tuple[str, str, str] = ("L", "P", "S"),
    slope: float = 1.0,
    intercept: float = 0.0,
    dtype: str = "int16",
    shuffle: bool = True,
    names: list[str] | None = None,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """One file per slice in ``out_dir``; returns the paths (shuffled unless ``shuffle`` is False)."""
    if isinstance(source, Path):
        image = nib.load(str(source))
        array, affine = np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
    else:
        array, affine = source
    array, affine = reorient(np.asarray(array), np.asarray(affine, dtype=np.float64), orientation)
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    stored = np.round((array.astype(np.float64) - intercept) / slope)
    info = np.iinfo(np.dtype(dtype))
    assert stored.min() >= info.min and stored.max() <= info.max, "values do not fit the stored type"
    stored = stored.astype(dtype)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), series_uid or generate_uid(), \
        frame_uid or generate_uid()
    n = array.shape[2]
    names = names or [f"IM_{k}" for k in range(n)]
    assert len(names) == n
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName, ds.StudyID = "TEST", "Test^Patient", "1"
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = _ds((lps @ np.array([0, 0, k, 1.0]))[:3])
        ds.ImageOrientationPatient = _ds([*row_dir, *col_dir])
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # row spacing (between rows), column spacing
        ds.SliceThickness = format_number_as_ds(float(spacing[2]))
        plane = np.ascontiguousarray(stored[:, :, k].T)  # rows = j, columns = i
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if dtype == "int16" else 0
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(float(slope)), format_number_as_ds(float(intercept))
        ds.RescaleType = "HU"
        ds.PixelData = plane.astype(plane.dtype.newbyteorder("<")).tobytes()
        path = out_dir / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_series(paths: list[Path], *, arcnames: list[str] | None = None) -> bytes:
    """The files as one zip (under their base names, or ``arcnames``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, path in enumerate(paths):
            zf.write(path, arcnames[n] if arcnames else path.name)
    return buffer.getvalue()


def sitk_nifti(paths: list[Path], target: Path) -> Path:
    """What SimpleITK's ImageSeriesReader reads from the series, written with sitk.WriteImage."""
    import SimpleITK as sitk

    directory = paths[0].parent
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(directory))
    reader.SetFileNames(files)
    sitk.WriteImage(reader.Execute(), str(target))
    return target


def read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)
