from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.responses import PG_INT_MAX
from app.jobs.states import DatasetJobOut

CompareMetric = Literal["dice", "iou", "nsd", "hd95", "dice_known_slices", "slice_dice_mean"]
METRIC_KEYS: dict[str, str] = {
    "dice": "Dice", "iou": "IoU", "nsd": "NSD", "hd95": "HD95",
    "dice_known_slices": "Dice_known_slices", "slice_dice_mean": "slice_dice_mean",
}


class EvaluationFromSegmentation(BaseModel):
    """Score the latest finished segmentation of ``model`` of every case that has a reference."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["segmentation"]
    model: str = "litemedsam"
    nsd_tolerance_mm: float = Field(default=2.0, gt=0, le=100, description="NSD tolerance in mm")


class EvaluationFromTraining(BaseModel):
    """Score a finished training's predictions of the test cases that have a reference."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["training"]
    training: int = Field(ge=1, le=PG_INT_MAX, description="a finished training of this dataset")
    nsd_tolerance_mm: float = Field(default=2.0, gt=0, le=100, description="NSD tolerance in mm")


EvaluationFromJson = Annotated[EvaluationFromSegmentation | EvaluationFromTraining, Field(discriminator="source")]


class CompareRequest(BaseModel):
    """Two evaluations (``a``, ``b``), or two trainings (``training_a``, ``training_b``: each one's newest
    finished evaluation); exactly one of the two forms."""

    model_config = ConfigDict(extra="forbid")

    a: int | None = Field(default=None, ge=1, le=PG_INT_MAX, description="evaluation id")
    b: int | None = Field(default=None, ge=1, le=PG_INT_MAX, description="evaluation id")
    training_a: int | None = Field(default=None, ge=1, le=PG_INT_MAX,
                                   description="training id: its newest finished evaluation (source training)")
    training_b: int | None = Field(default=None, ge=1, le=PG_INT_MAX,
                                   description="training id: its newest finished evaluation (source training)")
    metric: CompareMetric = Field(
        default="dice",
        description="hd95 includes the penalty of missed/hallucinated organs (the field-of-view diagonal); "
                    "dice_known_slices (renamed from dice_prompted_slices) is Dice over the slices the crowd "
                    "prompted or saw",
    )

    @model_validator(mode="after")
    def _one_form(self) -> CompareRequest:
        evaluations = (self.a, self.b)
        trainings = (self.training_a, self.training_b)
        if all(v is not None for v in evaluations) and all(v is None for v in trainings):
            return self
        if all(v is not None for v in trainings) and all(v is None for v in evaluations):
            return self
        raise ValueError("give either 'a' and 'b' (evaluation ids) or 'training_a' and 'training_b' "
                         "(training ids), not both and not one of a pair")


class EvaluationOut(DatasetJobOut):
    result: dict[str, Any] | None = Field(
        default=None,
        description="per case and label Dice, IoU, TP, FP, FN, TN, n_pred, n_ref, NSD, HD95 (null = NaN: both "
                    "masks empty) with HD95_penalized (a missed or hallucinated organ: HD95 = the image's "
                    "field-of-view diagonal in mm, kept in the means), Dice_known_slices (the slices prompted or "
                    "seen, as an ignore export keeps them) and per prompted slice Dice beside per volume Dice; "
                    "class means, foreground_mean, and hd95 (per label: cases in the mean, penalized, both empty)",
    )
