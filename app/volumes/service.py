"""Volume upload: validate everything first, then write files, then the row commits.

Memory (DESIGN §9 "Upload memory"): one upload holds one decoded file at a time, as stored in the file, plus
temporaries of a bounded size. The image's canonical cache is written block by block and the image's
voxels are dropped before the reference is read; the reference's label map is built in its final type.
:func:`upload_memory_bytes` is that cost, checked from the header against ``CROWDSAM_UPLOAD_MEMORY_BYTES``
before a voxel is decoded.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.errors import Conflict, Invalid, PayloadTooLarge
from app.core.hashing import sha256_file
from app.core.storage import Storage
from app.datasets.models import Dataset
from app.imaging import dicom, nifti
from app.imaging.coords import Orientation, orientation_codes
from app.imaging.labelmaps import save_label_map
from app.imaging.nifti import (
    NiftiHeader,
    Voxels,
    label_dtype,
    read_header,
    read_voxels,
    same_geometry,
)
from app.prompts.repository import PromptRepository
from app.segmentations import preencode
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository
from app.volumes.schemas import CASE_ID_PATTERN

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MiB = 1 << 20
# Peak memory of one upload = voxels × bytes per voxel + fixed_bytes() (tests/test_upload_memory.py checks it):
# bytes per voxel = the file's stored voxel size (a reference: + its label map's, 1 or 2).
CHUNK_BYTES_PER_VOXEL = 32  # one chunk's temporaries, per chunk voxel (measured ≤ 24: scaling to float64)
BASE_BYTES = 4 * MiB  # the request's own objects (measured ≤ 2 MiB)


@dataclass
class UploadedFile:
    path: Path
    filename: str


@dataclass
class DicomSource:
    """A volume converted from a DICOM series: what it keeps of the series, and the headers zip to store."""

    info: dicom.SeriesInfo
    headers_zip: Path


@dataclass
class ReferenceOptions:
    mapping: dict[int, str] | None = None  # source value → label name
    other_to_background: bool = False


def parse_reference_map(raw: str | None, dataset: Dataset) -> dict[int, str] | None:
    if raw is None or raw.strip() == "":
        return None
    import json

    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Invalid(f"reference_map: not valid JSON ({exc.msg})") from exc
    if not isinstance(parsed, dict) or not parsed:
        raise Invalid('reference_map: must be a non-empty JSON object like {"1": "spleen"}')
    mapping: dict[int, str] = {}
    for key, name in parsed.items():
        if not re.fullmatch(r"\d+", str(key)) or int(key) == 0:
            raise Invalid(f"reference_map: key {key!r} must be a positive integer source value")
        if name not in dataset.labels:
            raise Invalid(f"reference_map: {key} → {name!r} is not a label of this dataset")
        mapping[int(key)] = str(name)
    return mapping


def _check_filename(upload: UploadedFile, what: str) -> None:
    name = upload.filename.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        raise Invalid(f"{what}: file name {upload.filename!r} must end in .nii or .nii.gz")


def remap_reference(
    ref: Voxels, dataset: Dataset, options: ReferenceOptions
) -> tuple[npt.NDArray[np.unsignedinteger[Any]], list[str]]:
    """Reference values → the dataset's label values; unknown values are an error unless mapped away.

    Two passes over chunks: check the values and find which occur, then fill a label map of the
    smallest type that holds the labels found (what :func:`save_label_map` writes).
    """
    if options.mapping is not None:
        source_to_target = {v: dataset.labels[name] for v, name in options.mapping.items()}
    else:
        source_to_target = {v: v for v in dataset.labels.values()}
    kind = ref.dtype.kind
    negative = False
    present: set[int] = set()
    unknown = np.zeros(0, dtype=ref.dtype)  # the 50 smallest values found that are not mapped
    for _, chunk in ref.chunks():
        if kind == "f" and (not np.all(np.isfinite(chunk)) or not np.all(chunk == np.round(chunk))):
            raise Invalid("reference: label map has non-integer values")
        if negative or (kind in "iuf" and chunk.min() < 0):
            negative = True  # reported once no chunk has non-integer values
            continue
        values = np.unique(chunk)
        values = values[values != 0]
        known = np.zeros(values.shape, dtype=bool)
        for source in source_to_target:
            hit = values == source
            if hit.any():
                present.add(source)
                known |= hit
        unknown = np.union1d(unknown, values[~known])[:50]
    if negative:
        raise Invalid("reference: label map has negative values")
    if unknown.size and not options.other_to_background:
        hint = " (send reference_map and reference_other=background to keep only mapped structures)"
        raise Invalid(f"reference: values {[int(v) for v in unknown]} are not labels of this dataset{hint}")
    targets = {source_to_target[v] for v in present}
    out = np.zeros(ref.shape, dtype=label_dtype(max(targets, default=0)), order=ref.order)
    if targets:
        flat = ref.flat(out)
        for part, chunk in ref.chunks():
            block = flat[part]
            for source in present:
                block[chunk == source] = source_to_target[source]
    by_value = {v: k for k, v in dataset.labels.items()}
    return out, sorted(by_value[v] for v in targets)


def _canonical_cache_dtype(voxels: Voxels) -> np.dtype[Any]:
    """int16 when every value fits (most CT), else float32 (a scaled file decodes to floats)."""
    stored = voxels.stored
    if voxels.dtype.kind in "iu" and stored.size and stored.min() >= -32768 and stored.max() <= 32767:
        return np.dtype(np.int16)
    return np.dtype(np.float32)


def _c_order_blocks(array: npt.NDArray[Any], limit: int) -> Iterator[npt.NDArray[Any]]:
    """Views of a 3D array that, one after the other, cover it in C order; at most ``limit`` voxels each."""
    nx, ny, nz = array.shape
    if ny * nz <= limit:
        step = max(1, limit // (ny * nz))
        for i in range(0, nx, step):
            yield array[i: i + step]
    elif nz <= limit:
        step = limit // nz
        for i in range(nx):
            for j in range(0, ny, step):
                yield array[i, j: j + step]
    else:
        for i in range(nx):
            for j in range(ny):
                for k in range(0, nz, limit):
                    yield array[i, j, k: k + limit]


def write_canonical(voxels: Voxels, orientation: Orientation, path: Path) -> tuple[int, int, int]:
    """Write the closest-canonical array as ``np.save`` would (C order, int16 or float32), block by block."""
    dtype = _canonical_cache_dtype(voxels)
    canonical = orientation.canonical(voxels.stored)  # a view: flips and a transpose of the stored voxels
    shape = (int(canonical.shape[0]), int(canonical.shape[1]), int(canonical.shape[2]))
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for block in _c_order_blocks(canonical, nifti.CHUNK_VOXELS):
            fh.write(voxels.header.scale(block).astype(dtype, order="C").data.cast("B"))
    return shape


# --- memory ---------------------------------------------------------------------------------------
def fixed_bytes() -> int:
    """What an upload needs whatever the volume's size: one chunk's temporaries, a gzip read, the rest."""
    return nifti.CHUNK_VOXELS * CHUNK_BYTES_PER_VOXEL + 2 * nifti.READ_BYTES + BASE_BYTES


def image_bytes_per_voxel(header: NiftiHeader) -> int:
    """The image's voxels as stored; scaling, checks and the canonical cache go chunk by chunk."""
    return header.stored_dtype.itemsize


def reference_bytes_per_voxel(header: NiftiHeader, dataset: Dataset) -> int:
    """The reference's voxels as stored plus the label map (uint8, or uint16 for label values above 255)."""
    return header.stored_dtype.itemsize + label_dtype(max(dataset.labels.values(), default=0)).itemsize


def upload_memory_bytes(header: NiftiHeader, bytes_per_voxel: int) -> int:
    return header.n_voxels * bytes_per_voxel + fixed_bytes()


def check_upload_memory(header: NiftiHeader, bytes_per_voxel: int, budget: int) -> None:
    """413 before decoding when the file would need more than the per-upload memory budget."""
    need = upload_memory_bytes(header, bytes_per_voxel)
    if need <= budget:
        return
    fixed = fixed_bytes()
    fits = max(0, (budget - fixed) // bytes_per_voxel)
    raise PayloadTooLarge(
        f"{header.what}: {'×'.join(map(str, header.shape))} {header.stored_dtype} voxels need about "
        f"{need / MiB:.0f} MiB to validate ({header.n_voxels} voxels × {bytes_per_voxel} bytes + "
        f"{fixed / MiB:.0f} MiB), above the per-upload memory budget of {budget / MiB:.0f} MiB "
        f"(CROWDSAM_UPLOAD_MEMORY_BYTES; at most {fits} voxels of this type fit)"
    )


def upload_volume(
    session: Session,
    storage: Storage,
    dataset: Dataset,
    *,
    image: UploadedFile,
    case_id: str,
    split: str,
    reference: UploadedFile | None,
    reference_options: ReferenceOptions,
    dicom_source: DicomSource | None = None,
) -> Volume:
    """Validate a NIfTI image (and reference), store its files and add the row (committed by the caller)."""
    settings = get_settings()
    repo = _check_case(session, dataset, case_id, split)
    _check_filename(image, "image")
    budget = settings.upload_memory_bytes
    header = read_header(image.path, "image", max_voxels=settings.max_voxels, max_dim=settings.max_dim)
    check_upload_memory(header, image_bytes_per_voxel(header), budget)
    orientation = Orientation.from_affine(header.affine, header.shape)
    with tempfile.TemporaryDirectory(prefix="crowdsam-upload-") as tmp:
        canonical_path = Path(tmp) / "canonical.npy"
        canonical_shape = write_canonical(read_voxels(header), orientation, canonical_path)  # voxels dropped
        reference_path = Path(tmp) / "reference.nii.gz"
        present: list[str] | None = None
        if reference is not None:
            _check_filename(reference, "reference")
            ref_header = read_header(
                reference.path, "reference", max_voxels=settings.max_voxels, max_dim=settings.max_dim
            )
            check_upload_memory(ref_header, reference_bytes_per_voxel(ref_header, dataset), budget)
            ref_voxels = read_voxels(ref_header)
            _check_same_geometry(header, ref_header)
            labels, present = remap_reference(ref_voxels, dataset, reference_options)
            del ref_voxels
            save_label_map(labels, header.image, reference_path)
            del labels
        try:
            with session.begin_nested():  # a concurrent upload may take the case id between check and insert
                row = _volume_row(dataset, case_id, split, image, header, orientation, canonical_shape, present)
                if dicom_source is not None:
                    info = dicom_source.info
                    row.source_format = "dicom"
                    row.study_instance_uid = info.study_instance_uid
                    row.series_instance_uid = info.series_instance_uid
                    row.frame_of_reference_uid = info.frame_of_reference_uid
                volume = repo.add(row)
        except IntegrityError as exc:
            raise Conflict(f"case_id {case_id!r} already exists in dataset {dataset.id}") from exc
        prefix = f"volumes/{volume.id}"
        suffix = ".nii.gz" if image.path.name.endswith(".gz") else ".nii"
        try:
            volume.image_key = f"{prefix}/image{suffix}"
            storage.put_file(volume.image_key, image.path)
            volume.canonical_key = f"{prefix}/canonical.npy"
            storage.put_file(volume.canonical_key, canonical_path)
            if present is not None:
                volume.reference_key = f"{prefix}/reference.nii.gz"
                storage.put_file(volume.reference_key, reference_path)
            if dicom_source is not None:
                volume.dicom_key = f"{prefix}/dicom/headers.zip"
                storage.put_file(volume.dicom_key, dicom_source.headers_zip)
            session.flush()
        except BaseException:
            storage.delete_prefix(prefix)
            raise
    if PromptRepository(session).dataset_has_answers(dataset.id):  # the crowd will get these slices soon
        preencode.request_after_commit(session, volume.id, range(volume.n_slices))
    return volume


def _check_case(session: Session, dataset: Dataset, case_id: str, split: str) -> VolumeRepository:
    if not re.fullmatch(CASE_ID_PATTERN, case_id):
        raise Invalid(f"case_id {case_id!r}: use 1-100 letters, digits, '_', '-', '.' (starting alphanumeric)")
    if split not in ("train", "test"):
        raise Invalid(f"split {split!r}: must be 'train' or 'test'")
    repo = VolumeRepository(session)
    if repo.by_case(dataset.id, case_id) is not None:
        raise Conflict(f"case_id {case_id!r} already exists in dataset {dataset.id}")
    return repo


def upload_dicom_volume(
    session: Session,
    storage: Storage,
    dataset: Dataset,
    *,
    files: list[UploadedFile],
    case_id: str,
    split: str,
    reference: UploadedFile | None,
    reference_options: ReferenceOptions,
) -> Volume:
    """A CT series (one zip, or its slices as files) → NIfTI, then the NIfTI upload path above.

    The stored image is the converted NIfTI (voxel (i, j, k) = column i, row j of slice k, as SimpleITK
    writes a series); the series' headers without pixels go to ``volumes/{id}/dicom/headers.zip``.
    """
    settings = get_settings()
    _check_case(session, dataset, case_id, split)
    with tempfile.TemporaryDirectory(prefix="crowdsam-dicom-") as tmp:
        work = Path(tmp)
        if len(files) == 1 and dicom.is_zip(files[0].path):
            unpacked = work / "unpacked"
            unpacked.mkdir()
            members = dicom.extract_zip(files[0].path, unpacked, max_bytes=settings.max_upload_bytes)
        elif len(files) > 1:
            members = [(f.path, f.filename or f.path.name) for f in files]
        else:
            raise Invalid("image: a single DICOM file is not a volume; upload the whole series "
                          "(one zip, or each slice as its own 'image' part)")
        nifti_path, headers_zip = work / "image.nii.gz", work / "headers.zip"
        info = dicom.read_series(members, nifti_path, headers_zip, max_voxels=settings.max_voxels,
                                 max_dim=settings.max_dim, memory_budget=settings.upload_memory_bytes)
        return upload_volume(
            session, storage, dataset, image=UploadedFile(nifti_path, "image.nii.gz"), case_id=case_id,
            split=split, reference=reference, reference_options=reference_options,
            dicom_source=DicomSource(info, headers_zip),
        )


def _volume_row(
    dataset: Dataset,
    case_id: str,
    split: str,
    image: UploadedFile,
    header: NiftiHeader,
    orientation: Orientation,
    canonical_shape: tuple[int, int, int],
    reference_labels: list[str] | None,
) -> Volume:
    """The row for a validated upload; file keys are filled in once the id is known."""
    return Volume(
        dataset_id=dataset.id,
        case_id=case_id,
        split=split,
        image_key="pending",
        canonical_key="pending",
        shape=list(header.shape),
        canonical_shape=list(canonical_shape),
        spacing=list(header.spacing),
        affine=header.affine.tolist(),
        orientation=orientation_codes(header.affine),
        dtype=str(header.image.header.get_data_dtype()),
        sha256=sha256_file(image.path),
        size_bytes=image.path.stat().st_size,
        reference_labels=reference_labels,
    )


def _check_same_geometry(image: NiftiHeader, ref: NiftiHeader) -> None:
    if ref.shape != image.shape:
        raise Invalid(f"reference: shape {ref.shape} differs from the image's {image.shape}")
    if not same_geometry(ref.affine, image.affine):
        raise Invalid("reference: affine differs from the image's (label maps must share its geometry)")
