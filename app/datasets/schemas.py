from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RESERVED_LABELS = {"background", "ignore"}
LABEL_CODES_DOC = (
    "label name → coded concept {scheme, code, meaning} for DICOM SEG (e.g. {'spleen': {'scheme': 'SCT', "
    "'code': '78961009', 'meaning': 'Spleen'}}); adds to and overrides crowdsam's built-in SNOMED CT table"
)


class Window(BaseModel):
    level: float = Field(default=40.0, ge=-2000, le=5000)
    width: float = Field(default=400.0, gt=0, le=10000)


class TaskPolicyIn(BaseModel):
    """How GET /tasks/next hands out a dataset's slices; an omitted field keeps its value, null = the default."""

    model_config = ConfigDict(extra="forbid")

    min_views: int | None = Field(default=None, ge=1, le=50, description="annotators who must see every slice "
                                                                           "(default CROWDSAM_TASK_MIN_VIEWS, 3)")
    max_views: int | None = Field(default=None, ge=1, le=50,
                                  description="views a disputed slice may get (default CROWDSAM_TASK_MAX_VIEWS, 5; "
                                              "never below min_views)")
    min_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="slices whose crowd agreement (majority share of 'drew this organ' "
                                                  "vs 'did not', and mean pairwise box IoU) is below this are disputed "
                                                  "(default CROWDSAM_TASK_MIN_AGREEMENT, 0.7)")
    gold_rate: float | None = Field(
        default=None, ge=0.0, le=1.0, description="share of tasks drawn at random from slices of volumes with a "
                                                  "reference, to calibrate annotators (default "
                                                  "CROWDSAM_TASK_GOLD_RATE, 0)")

    @model_validator(mode="after")
    def _views(self) -> TaskPolicyIn:
        if self.min_views is not None and self.max_views is not None and self.max_views < self.min_views:
            raise ValueError(f"max_views ({self.max_views}) must be at least min_views ({self.min_views})")
        return self


class TaskPolicy(BaseModel):
    """The task policy in force (the dataset's values, else the service's defaults)."""

    min_views: int
    max_views: int
    min_agreement: float
    gold_rate: float


class LabelCode(BaseModel):
    """A coded concept for a label in DICOM SEG exports, e.g. SCT 78961009 "Spleen"."""

    model_config = ConfigDict(extra="forbid")

    scheme: str = Field(min_length=1, max_length=16, description="coding scheme, e.g. 'SCT'")
    code: str = Field(min_length=1, max_length=64, description="code value, e.g. '78961009'")
    meaning: str = Field(min_length=1, max_length=64, description="code meaning, e.g. 'Spleen'")

    @field_validator("scheme", "code", "meaning")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain a backslash or control characters (DICOM text)")
        return value


LabelCodes = dict[str, LabelCode]


def check_label_codes(codes: LabelCodes | None, labels: dict[str, int]) -> None:
    """Every name in ``codes`` must be a label of the dataset."""
    unknown = sorted(set(codes or {}) - set(labels))
    if unknown:
        raise ValueError(f"label_codes names {unknown}, which are not labels of the dataset (has: {sorted(labels)})")


class DatasetCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    labels: dict[str, int] = Field(description="label name → positive integer value, e.g. {'spleen': 1}")
    prompt_classes: dict[str, str] | None = Field(
        default=None, description="YOLO class index → label name, e.g. {'0': 'spleen'}"
    )
    window: Window = Field(default_factory=Window)
    tasks_only: bool = Field(
        default=False, description="annotators may post only to slices handed to them by GET /tasks/next "
                                   "(or that they already worked on)")
    annotators: list[str] = Field(
        default_factory=list, max_length=1000,
        description="names of annotator tokens that may label this dataset (more: PUT .../members/{name})")
    tasks: TaskPolicyIn = Field(default_factory=TaskPolicyIn, description="task assignment (GET /tasks/next)")
    label_codes: LabelCodes | None = Field(default=None, max_length=1000, description=LABEL_CODES_DOC)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, int]) -> dict[str, int]:
        if not labels:
            raise ValueError("at least one label is required")
        for name, value in labels.items():
            if not name.strip() or len(name) > 100:
                raise ValueError(f"label name {name!r} must be 1-100 non-blank characters")
            if name in RESERVED_LABELS:
                raise ValueError(f"label name {name!r} is reserved")
            if value < 1 or value > 65535:
                raise ValueError(f"label {name!r}: value {value} must be an integer in 1..65535")
        values = list(labels.values())
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"label values must be unique; repeated: {duplicates}")
        return labels

    @model_validator(mode="after")
    def _prompt_classes(self) -> DatasetCreate:
        for key, name in (self.prompt_classes or {}).items():
            if not key.isdigit():
                raise ValueError(f"prompt class {key!r} must be a non-negative integer")
            if name not in self.labels:
                raise ValueError(f"prompt class {key} names unknown label {name!r}")
        check_label_codes(self.label_codes, self.labels)
        return self


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    labels: dict[str, int]
    prompt_classes: dict[str, str] | None
    window: Window
    tasks_only: bool
    tasks: TaskPolicy
    label_codes: dict[str, dict[str, str]] | None = Field(default=None, description="the dataset's own codes")
    created_at: datetime


class DatasetUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: TaskPolicyIn | None = Field(default=None, description="task assignment: given fields change")
    label_codes: LabelCodes | None = Field(default=None, max_length=1000,
                                           description=f"{LABEL_CODES_DOC}; replaces the table, null clears it")


class MemberOut(BaseModel):
    token_id: int
    name: str = Field(description="the token's name (the annotator identity)")
    token_role: Literal["researcher", "annotator"]
    role: Literal["owner", "annotator"] = Field(description="owner: manages the dataset; annotator: labels it")
    created_at: datetime
