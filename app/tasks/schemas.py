"""The task handed to an annotator (contract: GET /api/v1/tasks/next)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class TaskOut(BaseModel):
    dataset_id: int
    volume_id: int
    case_id: str
    slice: int
    labels: dict[str, int] = Field(description="the dataset's labels: name → value")
    colors: dict[str, str] = Field(description="label name → #rrggbb")
    slice_url: str
    display_size: list[int] = Field(description="[width, height] of the display slice")
    lease_expires_at: datetime
    done: int = Field(description="slices of this dataset the annotator has seen (in `next`: once this is answered)")
    next: TaskOut | None = Field(
        default=None,
        description="with ?ahead=1 only: the task after this one, leased too (null when none is left)",
    )
