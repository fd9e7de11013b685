"""The export job kind: an nnU-Net v2 raw dataset and its archive (queue ``cpu``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.exports.models import Export
from app.jobs.kinds import JobKind, register


class ExportCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    volume_id: int
    case_id: str
    split: Literal["train", "test"]
    segmentation_id: int | None = None  # the labels of a train case (label_source "segmentation")


class ExportParams(BaseModel):
    """The request as resolved when it was accepted: every case and where its labels come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["nnunet-v2"]
    dataset_number: int
    dataset_name: str
    folder: str
    label_source: Literal["reference", "segmentation"]
    model: str | None
    unprompted: Literal["background", "ignore"]
    derived: Literal["ignore", "known"] = "ignore"  # gap-filled slices under unprompted="ignore"
    include_test: bool
    cases: list[ExportCase]
    mask_formats: tuple[Literal["nifti", "dicom-seg"], ...] = ("nifti",)  # + dicom_seg/{case}.dcm


KIND = register(JobKind(
    name="export",
    model=Export,
    params=ExportParams,
    queue="cpu",
    entry="workers.jobs.export.run_export",
    retry_intervals=(5, 30),
    describe=lambda row: f"nnU-Net export {row.id} of dataset {row.dataset_id}",
))
