from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.states import DatasetJobOut

DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class ExportCreate(BaseModel):
    """Parameters of an nnU-Net v2 raw dataset export."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["nnunet-v2"] = "nnunet-v2"
    dataset_number: int = Field(description="nnU-Net dataset id, 11..999 (001-010 are reserved by nnU-Net)")
    dataset_name: str | None = Field(default=None, description="folder suffix; default: the dataset's name, sanitised")
    label_source: Literal["reference", "segmentation"] = "reference"
    model: str | None = Field(default=None, description="segmentation model (label_source=segmentation)")
    unprompted: Literal["background", "ignore"] = Field(
        default="background", description="'ignore' marks slices no annotator saw with nnU-Net's ignore label"
    )
    derived: Literal["ignore", "known"] = Field(default="ignore", description=(
        "with unprompted='ignore': gap-filled slices of segmentations made with fill_gaps (derived boxes, no "
        "crowd vote) stay 'ignore' (default) or count as 'known' with their derived labels"))
    include_test: bool = True
    mask_formats: list[Literal["nifti", "dicom-seg"]] = Field(
        default=["nifti"], min_length=1, max_length=2,
        description="label files written: 'nifti' (nnU-Net's labelsTr/labelsTs, always) and optionally "
                    "'dicom-seg': a DICOM Segmentation per labelled case in dicom_seg/{case}.dcm beside them")

    @field_validator("mask_formats")
    @classmethod
    def _mask_formats(cls, value: list[str]) -> list[str]:
        if "nifti" not in value:
            raise ValueError("mask_formats must include 'nifti' (the nnU-Net layout is always written)")
        if len(set(value)) != len(value):
            raise ValueError(f"mask_formats {value} repeats a format")
        return value

    @field_validator("dataset_number")
    @classmethod
    def _number(cls, value: int) -> int:
        if not 1 <= value <= 999:
            raise ValueError(f"dataset_number {value} must be in 1..999 (three digits)")
        if value <= 10:
            raise ValueError(f"dataset_number {value} is reserved by nnU-Net (001-010); use 11..999")
        return value


class ExportFile(BaseModel):
    path: str
    size: int
    sha256: str


class ExportOut(DatasetJobOut):
    format: str
    folder: str | None = Field(default=None, description="DatasetXXX_Name")
    files: list[ExportFile] | None = None
    archive: ExportFile | None = Field(default=None, description="the .tar.gz (GET .../archive)")
    dataset_json: dict[str, Any] | None = None
