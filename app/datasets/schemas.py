from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RESERVED_LABELS = {"background", "ignore"}


class Window(BaseModel):
    level: float = Field(default=40.0, ge=-2000, le=5000)
    width: float = Field(default=400.0, gt=0, le=10000)


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
        return self


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    labels: dict[str, int]
    prompt_classes: dict[str, str] | None
    window: Window
    tasks_only: bool
    created_at: datetime


class MemberOut(BaseModel):
    token_id: int
    name: str = Field(description="the token's name (the annotator identity)")
    token_role: Literal["researcher", "annotator"]
    role: Literal["owner", "annotator"] = Field(description="owner: manages the dataset; annotator: labels it")
    created_at: datetime
