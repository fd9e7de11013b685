"""Volume upload: validate everything first, then write files, then the row commits."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.errors import Conflict, Invalid
from app.core.storage import Storage, sha256_file
from app.datasets.models import Dataset
from app.imaging.coords import Orientation, orientation_codes
from app.imaging.nifti import LoadedNifti, load_nifti, same_geometry, save_label_map
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository
from app.volumes.schemas import CASE_ID_PATTERN

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class UploadedFile:
    path: Path
    filename: str


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
    ref: npt.NDArray[Any], dataset: Dataset, options: ReferenceOptions
) -> tuple[npt.NDArray[np.int32], list[str]]:
    """Reference values → the dataset's label values; unknown values are an error unless mapped away."""
    if ref.dtype.kind == "f" and (not np.all(np.isfinite(ref)) or not np.all(ref == np.round(ref))):
        raise Invalid("reference: label map has non-integer values")
    if ref.dtype.kind in "iuf" and ref.size and ref.min() < 0:
        raise Invalid("reference: label map has negative values")
    values = [int(v) for v in np.unique(ref) if v != 0]
    ints = ref.astype(np.int64)
    if options.mapping is not None:
        source_to_target = {v: dataset.labels[name] for v, name in options.mapping.items()}
    else:
        source_to_target = {v: v for v in dataset.labels.values()}
    unknown = [v for v in values if v not in source_to_target]
    if unknown and not options.other_to_background:
        hint = " (send reference_map and reference_other=background to keep only mapped structures)"
        raise Invalid(f"reference: values {unknown[:50]} are not labels of this dataset{hint}")
    out = np.zeros(ints.shape, dtype=np.int32)
    for source, target in source_to_target.items():
        out[ints == source] = target
    by_value = {v: k for k, v in dataset.labels.items()}
    present = sorted(by_value[int(v)] for v in np.unique(out) if v != 0)
    return out, present


def _canonical_cache_dtype(data: npt.NDArray[Any]) -> np.dtype[Any]:
    if data.dtype.kind in "iu" and data.size and data.min() >= -32768 and data.max() <= 32767:
        return np.dtype(np.int16)
    return np.dtype(np.float32)


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
) -> Volume:
    settings = get_settings()
    if not re.fullmatch(CASE_ID_PATTERN, case_id):
        raise Invalid(f"case_id {case_id!r}: use 1-100 letters, digits, '_', '-', '.' (starting alphanumeric)")
    if split not in ("train", "test"):
        raise Invalid(f"split {split!r}: must be 'train' or 'test'")
    repo = VolumeRepository(session)
    if repo.by_case(dataset.id, case_id) is not None:
        raise Conflict(f"case_id {case_id!r} already exists in dataset {dataset.id}")

    _check_filename(image, "image")
    loaded = load_nifti(image.path, "image", max_voxels=settings.max_voxels, max_dim=settings.max_dim)
    ref_labels: tuple[npt.NDArray[np.int32], list[str]] | None = None
    if reference is not None:
        _check_filename(reference, "reference")
        ref = load_nifti(reference.path, "reference", max_voxels=settings.max_voxels, max_dim=settings.max_dim)
        _check_same_geometry(loaded, ref)
        ref_labels = remap_reference(ref.data, dataset, reference_options)

    orientation = Orientation.from_affine(loaded.affine, loaded.data.shape)
    canonical = orientation.canonical(loaded.data)
    try:
        with session.begin_nested():  # a concurrent upload may take the case id between check and insert
            volume = repo.add(_volume_row(dataset, case_id, split, image, loaded, orientation, canonical, ref_labels))
    except IntegrityError as exc:
        raise Conflict(f"case_id {case_id!r} already exists in dataset {dataset.id}") from exc
    prefix = f"volumes/{volume.id}"
    suffix = ".nii.gz" if image.path.name.endswith(".gz") else ".nii"
    try:
        volume.image_key = f"{prefix}/image{suffix}"
        storage.put_file(volume.image_key, image.path)
        volume.canonical_key = f"{prefix}/canonical.npy"
        with tempfile.TemporaryDirectory() as tmp:
            npy = Path(tmp) / "canonical.npy"
            np.save(npy, np.ascontiguousarray(canonical.astype(_canonical_cache_dtype(canonical))))
            storage.put_file(volume.canonical_key, npy)
            if ref_labels is not None:
                ref_path = Path(tmp) / "reference.nii.gz"
                save_label_map(ref_labels[0], loaded.image, ref_path)
                volume.reference_key = f"{prefix}/reference.nii.gz"
                storage.put_file(volume.reference_key, ref_path)
        session.flush()
    except BaseException:
        storage.delete_prefix(prefix)
        raise
    return volume


def _volume_row(
    dataset: Dataset,
    case_id: str,
    split: str,
    image: UploadedFile,
    loaded: LoadedNifti,
    orientation: Orientation,
    canonical: npt.NDArray[Any],
    ref_labels: tuple[npt.NDArray[np.int32], list[str]] | None,
) -> Volume:
    """The row for a validated upload; file keys are filled in once the id is known."""
    return Volume(
        dataset_id=dataset.id,
        case_id=case_id,
        split=split,
        image_key="pending",
        canonical_key="pending",
        shape=list(loaded.data.shape),
        canonical_shape=list(canonical.shape),
        spacing=list(loaded.spacing),
        affine=loaded.affine.tolist(),
        orientation=orientation_codes(loaded.affine),
        dtype=str(loaded.image.header.get_data_dtype()),
        sha256=sha256_file(image.path),
        size_bytes=image.path.stat().st_size,
        reference_labels=ref_labels[1] if ref_labels else None,
    )


def _check_same_geometry(image: LoadedNifti, ref: LoadedNifti) -> None:
    if ref.data.shape != image.data.shape:
        raise Invalid(f"reference: shape {ref.data.shape} differs from the image's {image.data.shape}")
    if not same_geometry(ref.affine, image.affine):
        raise Invalid("reference: affine differs from the image's (label maps must share its geometry)")
