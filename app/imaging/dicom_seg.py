"""DICOM Segmentation objects (SEG) from label maps on a NIfTI grid (pure: arrays, affines, datasets).

**Geometry.** NIfTI voxel ``(i, j, k)`` is column ``i``, row ``j`` of frame ``k``: the SEG's frames are
the label map's third-axis slices, each transposed. Positions and orientations come from the affine
converted from NIfTI's RAS to DICOM's LPS (x and y negated).

**Source series.** A SEG must reference the images it segments. For a volume uploaded as DICOM the
caller passes that series' headers (:func:`app.imaging.dicom.load_headers`); the SEG then references
its Study, Series, SOP Instance and Frame of Reference UIDs. For a NIfTI upload,
:func:`synthetic_ct_series` makes a minimal CT series in memory (headers only, no pixels) with the
label map's geometry, and the SEG references that *synthetic* series: its UIDs are derived from the
volume's sha256, so every SEG of one volume shares one study, series and frame of reference, but no
such CT images exist anywhere — a viewer loads the SEG against the NIfTI image, not against PACS.

**Segments.** One per label, numbered 1..n by ascending label value, coded from :data:`BUILTIN_CODES`
(SNOMED CT, category Anatomical Structure) or the dataset's own ``label_codes``. A label absent from
the mask gets no segment ("not found" = no segment); only when *no* requested label occurs are the
requested labels written as empty segments (a SEG needs at least one segment).

**Determinism.** UIDs come from a caller's seed and the dates from the caller's timestamp, so the same
inputs give the same bytes (a stable ETag).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, generate_uid

if TYPE_CHECKING:
    import highdicom as hd

Laterality = Literal["right", "left"]
CATEGORY = codes.SCT.AnatomicalStructure  # SCT 91723000, DICOM CID 7150 "Anatomical Structure"
_LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left}


@dataclass(frozen=True)
class LabelCode:
    """The coded concept of one segment: a property type, optionally with a laterality modifier."""

    scheme: str
    code: str
    meaning: str
    laterality: Laterality | None = None

    @classmethod
    def of(cls, code: Code, laterality: Laterality | None = None) -> LabelCode:
        return cls(code.scheme_designator, code.value, code.meaning, laterality)

    def as_dict(self) -> dict[str, str]:
        out = {"scheme": self.scheme, "code": self.code, "meaning": self.meaning}
        if self.laterality is not None:
            out["laterality"] = self.laterality
        return out


def _sct(name: str, laterality: Laterality | None = None) -> LabelCode:
    return LabelCode.of(getattr(codes.SCT, name), laterality)


# TotalSegmentator / abdominal-organ label names → SNOMED CT (values from pydicom's DICOM code tables).
# Right/left organs are the organ's code with a laterality modifier (SCT 24028007 Right / 7771000 Left),
# as DICOM SEG's Segmented Property Type Modifier Code Sequence intends.
BUILTIN_CODES: dict[str, LabelCode] = {
    "spleen": _sct("Spleen"),
    "kidney": _sct("Kidney"),
    "kidney_right": _sct("Kidney", "right"),
    "kidney_left": _sct("Kidney", "left"),
    "gallbladder": _sct("Gallbladder"),
    "liver": _sct("Liver"),
    "stomach": _sct("Stomach"),
    "pancreas": _sct("Pancreas"),
    "adrenal_gland": _sct("AdrenalGland"),
    "adrenal_gland_right": _sct("AdrenalGland", "right"),
    "adrenal_gland_left": _sct("AdrenalGland", "left"),
    "esophagus": _sct("Esophagus"),
    "duodenum": _sct("Duodenum"),
    "aorta": _sct("Aorta"),
    "inferior_vena_cava": _sct("InferiorVenaCava"),
    "portal_vein": _sct("PortalVein"),
    "urinary_bladder": _sct("UrinaryBladderStructure"),
    "prostate": _sct("Prostate"),
    "lung": _sct("Lung"),
    "lungs": _sct("Lung"),
    "lung_right": _sct("Lung", "right"),
    "lung_left": _sct("Lung", "left"),
    "heart": _sct("Heart"),
    "colon": _sct("Colon"),
    "small_bowel": _sct("SmallIntestine"),
    "trachea": _sct("Trachea"),
    "superior_vena_cava": _sct("SuperiorVenaCava"),
    "spinal_cord": _sct("SpinalCord"),
    "sacrum": _sct("Sacrum"),
    "brain": _sct("Brain"),
    "sternum": _sct("Sternum"),
}


class MissingLabelCodes(ValueError):
    """Labels that need a coded concept and have none (neither built in nor in the dataset's table)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = sorted(labels)
        example = {name: {"scheme": "SCT", "code": "...", "meaning": "..."} for name in self.labels[:2]}
        super().__init__(
            f"labels {self.labels} have no built-in SNOMED CT code: give each a coded concept in the "
            f"dataset's label_codes (PATCH /api/v1/datasets/{{id}} with {{\"label_codes\": {example}}})"
        )


def resolve_codes(names: Sequence[str], overrides: Mapping[str, Mapping[str, str]] | None) -> dict[str, LabelCode]:
    """The code of every label in ``names``: the dataset's own (``overrides``) first, else the built-in table.

    Raises :class:`MissingLabelCodes` naming every label that has neither.
    """
    table = dict(overrides or {})
    out: dict[str, LabelCode] = {}
    missing = []
    for name in names:
        if name in table:
            given = table[name]
            out[name] = LabelCode(given["scheme"], given["code"], given["meaning"])
        elif name in BUILTIN_CODES:
            out[name] = BUILTIN_CODES[name]
        else:
            missing.append(name)
    if missing:
        raise MissingLabelCodes(missing)
    return out


@dataclass(frozen=True)
class Algorithm:
    """How the labels were made. ``name=None`` → MANUAL (e.g. an uploaded reference), no algorithm item."""

    name: str | None = "crowdsam"
    version: str = ""
    model: str | None = None
    kind: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] = "SEMIAUTOMATIC"
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Geometry:
    """DICOM plane geometry of a NIfTI grid (LPS, millimetres)."""

    row_cosines: tuple[float, float, float]  # direction of increasing column index (NIfTI axis 0)
    column_cosines: tuple[float, float, float]  # direction of increasing row index (NIfTI axis 1)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) = (|axis 1|, |axis 0|)
    slice_thickness: float
    positions: list[tuple[float, float, float]]  # ImagePositionPatient of slice k

    @classmethod
    def from_affine(cls, affine: npt.ArrayLike, shape: Sequence[int]) -> Geometry:
        lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=float)[:3]
        axes = lps[:, :3]
        norms = np.linalg.norm(axes, axis=0)
        if not np.all(norms > 0):
            raise ValueError("the affine is singular: no DICOM geometry")
        row, col = axes[:, 0] / norms[0], axes[:, 1] / norms[1]
        positions = [tuple(float(x) for x in lps[:, 3] + k * axes[:, 2]) for k in range(int(shape[2]))]
        return cls(
            row_cosines=(float(row[0]), float(row[1]), float(row[2])),
            column_cosines=(float(col[0]), float(col[1]), float(col[2])),
            pixel_spacing=(float(norms[1]), float(norms[0])),
            slice_thickness=float(norms[2]),
            positions=positions,  # type: ignore[arg-type]
        )


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6g}"
    return "0" if text == "-0" else text


def synthetic_ct_series(
    affine: npt.ArrayLike,
    shape: Sequence[int],
    *,
    seed: str,
    patient_id: str,
    study_description: str,
    created: datetime,
) -> list[Dataset]:
    """A minimal CT series (headers only, one per slice k) on the grid of ``affine``/``shape``.

    Study, Series, Frame of Reference and SOP Instance UIDs derive from ``seed`` (deterministic).
    Only what a SEG needs to reference it is filled in: patient/study/series identity, the image plane
    (position, orientation, spacing, thickness) and the pixel description (16-bit signed, no pixels).
    """
    geometry = Geometry.from_affine(affine, shape)
    study, series, frame = (generate_uid(entropy_srcs=[seed, part]) for part in ("study", "series", "frame"))
    out = []
    for k, position in enumerate(geometry.positions):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "instance", str(k)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = patient_id[:64]
        ds.PatientName = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = created.strftime("%Y%m%d")
        ds.StudyTime = created.strftime("%H%M%S")
        ds.StudyDescription = study_description[:64]
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "synthetic series (NIfTI geometry)"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = int(shape[1]), int(shape[0])
        ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
        ds.SliceThickness = _ds(geometry.slice_thickness)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*geometry.row_cosines, *geometry.column_cosines)]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out


def _description(number: int, name: str, code: LabelCode, algorithm: Algorithm) -> hd.seg.SegmentDescription:
    import highdicom as hd  # imported on first use, not at API start (≈0.4 s)

    identification = None
    if algorithm.name is not None:
        params = {**({"model": algorithm.model} if algorithm.model else {}), **algorithm.parameters}
        identification = hd.AlgorithmIdentificationSequence(
            name=algorithm.name, family=codes.cid7162.ArtificialIntelligence,
            version=algorithm.version or "unknown", parameters=params or None,
        )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:64],
        segmented_property_category=CATEGORY,
        segmented_property_type=hd.sr.CodedConcept(code.code, code.scheme, code.meaning),
        algorithm_type=algorithm.kind if algorithm.name is not None else "MANUAL",
        algorithm_identification=identification,
    )
    if code.laterality is not None:
        modifier = _LATERALITY[code.laterality]
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)
        ]
    return description


def check_source(source: Sequence[Dataset], shape: Sequence[int]) -> None:
    """The source series must have one header per slice k, each ``shape[1]`` rows × ``shape[0]`` columns."""
    if len(source) != int(shape[2]):
        raise ValueError(f"the source series has {len(source)} images, the label map {shape[2]} slices")
    for k, ds in enumerate(source):
        if (int(ds.Rows), int(ds.Columns)) != (int(shape[1]), int(shape[0])):
            raise ValueError(f"source image {k} is {ds.Rows}x{ds.Columns}, the label map's slices are "
                             f"{shape[1]}x{shape[0]}")


# Type 2 patient/study attributes a SEG copies from its source: highdicom needs them present (empty is valid).
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def _completed(ds: Dataset) -> Dataset:
    """A copy of a source header with every missing type 2 attribute the SEG copies set to empty."""
    out = copy.deepcopy(ds)
    for keyword in _TYPE2_COPIED:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def segment_labels(labels: npt.NDArray[Any], values: Mapping[str, int]) -> dict[str, int]:
    """The labels of ``values`` that occur in ``labels`` (all of ``values`` when none occurs), by value."""
    present = {int(v) for v in np.unique(labels)}
    chosen = {n: v for n, v in values.items() if v in present} or dict(values)
    return dict(sorted(chosen.items(), key=lambda kv: kv[1]))


def build_segmentation(
    labels: npt.NDArray[np.integer[Any]],
    values: Mapping[str, int],
    label_codes: Mapping[str, LabelCode],
    source: Sequence[Dataset],
    *,
    algorithm: Algorithm,
    seed: str,
    created: datetime,
    series_description: str = "crowdsam segmentation",
) -> bytes:
    """A DICOM SEG (BINARY, one segment per label of :func:`segment_labels`) of the label map ``labels``
    (NIfTI grid; values are those of ``values``; others count as background), referencing ``source``
    (one header per slice k, real or :func:`synthetic_ct_series`). Returns the Part 10 file's bytes.
    """
    import highdicom as hd

    data = np.asarray(labels)
    if data.ndim != 3 or data.dtype.kind not in "ui":
        raise ValueError(f"label map must be a 3D integer array, not {data.dtype} {data.shape}")
    if data.size and int(data.min()) < 0:
        raise ValueError("label map has negative values")
    check_source(source, data.shape)
    chosen = segment_labels(data, values)
    lookup = np.zeros(max(int(data.max(initial=0)), *chosen.values()) + 1, dtype=np.uint16)
    for number, value in enumerate(chosen.values(), start=1):
        lookup[value] = number
    numbers = lookup[data]  # indexed with the map's own (unsigned or non-negative) type: no int64 copy
    frames = np.ascontiguousarray(numbers.transpose(2, 1, 0))  # (k, row j, column i)
    frames = frames.astype(np.uint8 if len(chosen) < 256 else np.uint16)
    descriptions = [_description(n, name, label_codes[name], algorithm) for n, name in enumerate(chosen, start=1)]
    seg = hd.seg.Segmentation(
        source_images=[_completed(ds) for ds in source],
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[seed, "seg-series"]),
        series_number=100,
        sop_instance_uid=generate_uid(entropy_srcs=[seed, "seg-instance"]),
        instance_number=1,
        manufacturer="crowdsam",
        manufacturer_model_name=(algorithm.model or "reference")[:64],
        software_versions=algorithm.version or "unknown",
        device_serial_number="0",
        content_label="SEGMENTATION",
        content_description=series_description[:64],
        content_creator_name=None,
    )
    seg.SeriesDescription = series_description[:64]
    # highdicom stamps "now" and a random dimension organization UID: make them the caller's, so the
    # same inputs give the same bytes
    for prefix in ("Content", "InstanceCreation", "Series"):
        setattr(seg, f"{prefix}Date", created.strftime("%Y%m%d"))
        setattr(seg, f"{prefix}Time", created.strftime("%H%M%S"))
    for item in seg.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    organization = generate_uid(entropy_srcs=[seed, "dimension-organization"])
    for item in (*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])):
        item.DimensionOrganizationUID = organization
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
