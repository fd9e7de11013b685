"""The evaluation job kind: predictions (segmentations, uploads, a training's) scored against references
(queue ``cpu``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.evaluations.models import Evaluation
from app.jobs.kinds import JobKind, register


class EvaluationCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    case_id: str
    volume_id: int
    prediction_key: str  # a label map in the dataset's values on the case's grid, in the store
    segmentation_id: int | None = None  # source "segmentation"
    prediction_file: str | None = None  # source "upload": the uploaded file's name


class EvaluationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["segmentation", "upload", "training"]
    model: str | None = None  # source "segmentation"
    training_id: int | None = None  # source "training": its predictions of the export's test cases
    label_values: str  # "dataset" or "export:<id>" (the values the uploaded files used)
    nsd_tolerance_mm: float = Field(gt=0, le=100)
    cases: list[EvaluationCase]
    missing_cases: list[str] = []
    skipped_files: list[str] = []


KIND = register(JobKind(
    name="evaluation",
    model=Evaluation,
    params=EvaluationParams,
    queue="cpu",
    entry="workers.jobs.evaluate.run_evaluation",
    retry_intervals=(5, 30),
    describe=lambda row: f"evaluation {row.id} of dataset {row.dataset_id}",
))
