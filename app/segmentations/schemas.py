from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

Fusion = Literal["majority", "staple", "weighted", "union"]
MAX_FILL_GAP = 64


class ModelOut(BaseModel):
    name: str
    family: str
    available: bool
    reason: str | None = Field(description="why the model cannot run here (missing/corrupt checkpoint)")
    checkpoint: str | None


class SegmentationCreate(BaseModel):
    model: str = Field(default="litemedsam", min_length=1, max_length=50, description="a name from GET /models")
    fusion: Fusion = Field(default="majority", description=(
        "how annotators' masks of one slice and organ merge; every annotator who saw the slice votes, "
        "a view without a box for the organ is an 'absent' vote. weighted: votes weighted by each "
        "annotator's sensitivity/specificity over the dataset (GET /datasets/{id}/annotators)"))
    labels: list[str] | None = Field(
        default=None, description="organs to segment (default: every dataset label that has prompts)"
    )
    fill_gaps: int = Field(default=0, ge=0, le=MAX_FILL_GAP, description=(
        "gap filling (opt-in): a slice nobody saw, between two slices with boxes of an organ at most this "
        "many slices apart, gets a box interpolated from theirs; such slices are marked derived in "
        "stats (derived_slices, per_slice[k][label].derived) and never count as crowd votes. 0 = off"))

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        if not labels:
            raise ValueError("labels: give at least one label name, or leave it out for all")
        if len(set(labels)) != len(labels):
            raise ValueError("labels: names must not repeat")
        return labels


class Progress(BaseModel):
    done: int = Field(description="prompted slices segmented so far")
    total: int = Field(description="prompted slices to segment")


class SegmentationOut(BaseModel):
    id: int
    volume_id: int
    model: str
    fusion: Fusion
    labels: list[str] | None
    fill_gaps: int = 0
    status: Literal["queued", "running", "finished", "failed", "canceled"]
    progress: Progress
    error: str | None = None
    cancel_requested: bool = False
    attempts: int
    stats: dict[str, Any] = Field(
        description="prompted_slices, per_slice, encoded, decoded, timings, labels (when finished)"
    )
    mask_url: str | None = Field(description="NIfTI label map on the image grid, once finished")
    mask_sha256: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class DatasetSegmentationsOut(BaseModel):
    ids: list[int] = Field(description="one segmentation per volume that has prompts")
    skipped: list[int] = Field(description="volumes of the dataset without prompts for the requested labels")
