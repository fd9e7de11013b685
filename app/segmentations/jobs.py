"""The segmentation job kind: one SAM run over a volume's prompts (queue ``sam``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from app.jobs.kinds import JobKind, register
from app.segmentations.models import Segmentation
from app.segmentations.schemas import Fusion


class SegmentationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    fusion: Fusion
    labels: list[str] | None  # None: every label that has prompts when the job runs
    fill_gaps: int = 0  # derived boxes in gaps of at most this many unknown slices (0 = off)


KIND = register(JobKind(
    name="segmentation",
    model=Segmentation,
    params=SegmentationParams,
    queue="sam",
    entry="workers.jobs.segment.run_segmentation",
    retry_intervals=(5, 30, 120),
    describe=lambda row: f"segmentation {row.id} of volume {row.volume_id} ({row.model})",
))
