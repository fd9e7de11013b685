from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from app.core.responses import PG_INT_MAX
from app.jobs.states import DatasetJobOut
from app.trainings.jobs import Configuration, Fold

TRAINER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"
N_FOLDS = 5  # nnU-Net's cross-validation: folds 0..4 of a 5-fold split of the training cases
RequestFold = StrictInt | Literal["all"]  # true or "1" is not a fold


class TrainingRequest(BaseModel):
    """An nnU-Net v2 training on a finished export of the dataset (then a prediction of its test cases)."""

    model_config = ConfigDict(extra="forbid")

    export_id: int = Field(ge=1, le=PG_INT_MAX, description="a finished export of this dataset")
    configuration: Configuration = "3d_fullres"
    folds: list[RequestFold] = Field(
        default=[0], min_length=1, max_length=N_FOLDS + 1,
        description="folds of nnU-Net's 5-fold cross-validation (0..4; needs at least 5 training cases) "
                    "and/or 'all' (train on every training case); the predictions ensemble every fold trained")
    trainer: str = Field(default="nnUNetTrainer", pattern=TRAINER_PATTERN,
                         description="nnU-Net trainer class name (nnunetv2.training.nnUNetTrainer...)")
    epochs: int = Field(default=1000, ge=1, le=4000, description="nnU-Net's default is 1000")
    iterations_per_epoch: int | None = Field(default=None, ge=1, le=100_000,
                                             description="training iterations per epoch (nnU-Net: 250)")
    val_iterations_per_epoch: int | None = Field(default=None, ge=1, le=100_000,
                                                 description="validation iterations per epoch (nnU-Net: 50)")
    patch_size: list[Annotated[int, Field(ge=8, le=1024)]] | None = Field(
        default=None, min_length=2, max_length=3,
        description="overrides the plan's patch size: 2 values for '2d', 3 otherwise (voxels, each 8..1024)")
    batch_size: int | None = Field(default=None, ge=1, le=512, description="overrides the plan's batch size")
    gpu_memory_target_gb: float | None = Field(
        default=None, gt=0, le=1024, description="nnU-Net planner's GPU memory target (its default: 8 GB)")
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="'auto': CUDA when the worker has a GPU, else CPU")
    tta: bool = Field(default=True, description="test-time augmentation (mirroring) when predicting")

    @field_validator("folds")
    @classmethod
    def _folds(cls, value: list[RequestFold]) -> list[RequestFold]:
        for fold in value:
            if fold != "all" and not 0 <= int(fold) < N_FOLDS:
                raise ValueError(f"fold {fold}: nnU-Net's cross-validation has folds 0..{N_FOLDS - 1}; "
                                 "use 'all' to train on every training case")
        if len(set(value)) != len(value):
            raise ValueError(f"folds {value} repeat a fold")
        return value

    @model_validator(mode="after")
    def _patch_size(self) -> TrainingRequest:
        if self.patch_size is not None:
            expected = 2 if self.configuration == "2d" else 3
            if len(self.patch_size) != expected:
                raise ValueError(f"patch_size {self.patch_size}: configuration {self.configuration!r} needs "
                                 f"{expected} values")
        return self


class TrainingOut(DatasetJobOut):
    export_id: int | None = Field(description="the export trained on (null once it was deleted; params keeps it)")
    configuration: str
    folds: list[Fold]
    progress: dict[str, Any] = Field(description=(
        "while it runs, as the worker writes it: done/total (epochs over every fold trained), phase (queued, "
        "start, plan, preprocess, train, validate, predict, store), device; while training fold, epoch/epochs and the "
        "last epoch's train_loss, val_loss, pseudo_dice (per label), ema, lr, epoch_s; while predicting "
        "cases_done/cases_total"))
    result: dict[str, Any] | None = Field(
        default=None,
        description="once finished: what the worker recorded (plans, final losses, pseudo-Dice, timings) and "
                    "predictions: [{case_id, volume_id, key}] (label maps in the dataset's values)")
    checkpoint_url: str | None = Field(default=None, description="GET: model.tar.gz (nnU-Net results folder)")
    predictions_url: str | None = Field(default=None, description="GET: predictions.tar.gz (test cases)")
    warnings: list[str] = Field(default=[], description="what the request accepted but you should know")
