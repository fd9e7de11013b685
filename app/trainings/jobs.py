"""The training job kind: nnU-Net v2 plan-and-preprocess, train and predict on an export (queue ``train``).

The worker side is ``workers.jobs.train.run_training``. Everything the worker needs is resolved when the
request is accepted (:mod:`app.trainings.service`): the export's folder and dataset number, its test cases,
and how its consecutive nnU-Net label values map back to the dataset's (``label_values_original``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.core.config import get_settings
from app.jobs.kinds import JobKind, register
from app.trainings.models import Training

Configuration = Literal["2d", "3d_fullres", "3d_lowres"]
Fold = int | Literal["all"]


class TrainingCase(BaseModel):
    """A test case of the export, predicted once the training has finished."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    case_id: str
    volume_id: int


class TrainingParams(BaseModel):
    """The request as resolved when it was accepted (the worker's whole input besides the export's files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    export_id: int
    configuration: Configuration
    folds: list[Fold]
    trainer: str
    epochs: int
    iterations_per_epoch: int | None = None  # None: the trainer's own (nnU-Net: 250)
    val_iterations_per_epoch: int | None = None  # None: the trainer's own (nnU-Net: 50)
    patch_size: list[int] | None = None  # None: nnU-Net's plan
    batch_size: int | None = None  # None: nnU-Net's plan
    gpu_memory_target_gb: float | None = None  # None: nnU-Net's planner default
    device: Literal["auto", "cuda", "cpu"]
    tta: bool
    # resolved from the export when the request was accepted
    dataset_number: int
    folder: str  # the export's DatasetXXX_Name
    test_cases: list[TrainingCase]
    label_values_original: dict[str, int]  # export label name → the dataset's value
    label_source: Literal["reference", "segmentation"]
    unprompted: Literal["background", "ignore"]


KIND = register(JobKind(
    name="training",
    model=Training,
    params=TrainingParams,
    queue="train",
    entry="workers.jobs.train.run_training",
    retry_intervals=(60,),
    describe=lambda row: f"nnU-Net training {row.id} of dataset {row.dataset_id}",
    timeout_s=lambda: get_settings().training_timeout_s,
))
