from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Split = Literal["train", "test"]
CASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class VolumeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    dataset_id: int
    case_id: str
    split: Split
    shape: list[int] = Field(description="original array shape, as uploaded")
    canonical_shape: list[int] = Field(description="shape in the closest-canonical RAS+ grid")
    spacing: list[float] = Field(description="voxel size in mm along the original axes")
    affine: list[list[float]]
    orientation: str = Field(description="axis codes of the original array, e.g. 'RAS', 'LPS'")
    n_slices: int = Field(description="number of axial slices (canonical S axis)")
    display_size: list[int] = Field(description="[width, height] of a display slice in pixels")
    dtype: str
    has_reference: bool
    reference_labels: list[str] | None = Field(description="labels present in the reference map")
    source_format: Literal["nifti", "dicom"] = Field(
        description="'dicom': converted from a DICOM series on upload (the image is that NIfTI)")
    study_instance_uid: str | None = Field(default=None, description="the source series' StudyInstanceUID")
    series_instance_uid: str | None = Field(default=None, description="the source series' SeriesInstanceUID")
    frame_of_reference_uid: str | None = Field(default=None, description="the source series' FrameOfReferenceUID")
    sha256: str
    size_bytes: int
    created_at: datetime
