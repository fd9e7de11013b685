"""Request and response bodies of the prompts API (see contracts: Prompts API)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Shapes only: ranges, arity and finiteness are checked by the service so that every problem
# is reported with its item index in one 422 (all-or-nothing).


class BoxIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slice: int = Field(description="display slice index k (canonical axial index)")
    label: str = Field(description="a label name of the dataset")
    box: list[float] = Field(description="[x0, y0, x1, y1] in display pixels, x1/y1 exclusive")
    client_id: uuid.UUID | None = Field(default=None, description="idempotency key, unique per annotator")


class PointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slice: int
    label: str
    point: list[float] = Field(description="[x, y] in display pixels")
    positive: bool = True
    client_id: uuid.UUID | None = None


MAX_ITEMS_PER_REQUEST = 20_000  # boxes + points, and seen slices, per request (the body limit is sized for it)


class PromptBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    boxes: list[BoxIn] = Field(default_factory=list, max_length=MAX_ITEMS_PER_REQUEST,
                               description=f"at most {MAX_ITEMS_PER_REQUEST} boxes + points per request")
    points: list[PointIn] = Field(default_factory=list, max_length=MAX_ITEMS_PER_REQUEST)
    seen: list[int] = Field(default_factory=list, max_length=MAX_ITEMS_PER_REQUEST,
                            description="slices seen (also when nothing was drawn)")


class PostResult(BaseModel):
    ids: list[int] = Field(description="ids of the posted prompts, boxes first then points, in request order")
    duplicates: list[int] = Field(description="ids among `ids` that already existed (same client_id)")
    seen: list[int] = Field(description="slices recorded as seen by the caller")


class PromptOut(BaseModel):
    id: int
    volume_id: int
    slice: int
    label: str
    annotator: str
    kind: Literal["box", "point"]
    box: list[float] | None
    point: list[float] | None
    positive: bool | None
    source: str
    client_id: uuid.UUID | None
    created_at: datetime


class PromptPage(BaseModel):
    items: list[PromptOut]
    total: int
    limit: int
    offset: int


class SimulateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    annotators: int = Field(default=3, ge=1, le=50)
    jitter: float = Field(default=0.05, ge=0.0, le=1.0, description="edge noise sd as a fraction of box size")
    coverage: float = Field(default=0.8, ge=0.0, le=1.0, description="probability an annotator sees a slice")
    miss_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="probability an organ is missed on a slice")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    labels: list[str] | None = Field(default=None, description="labels to prompt; default all in the reference")
    per_component: bool = Field(default=True, description="one box per connected 2D part (else one per organ)")
    min_component_pixels: int = Field(default=10, ge=1, le=1_000_000)
    organ_free_slices: bool = Field(
        default=False, description="annotators also see (with probability `coverage`) every slice holding none of "
                                   "the labels and answer nothing there (or a false positive); their views are stored")
    false_positive_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="probability, per seen slice and label absent from it, of a "
                                                 "false-positive box (the organ's box on the nearest slice holding it)")
    careless: int = Field(default=0, ge=0, le=50, description="how many of the annotators (the last ones) are careless")
    careless_jitter: float = Field(default=0.2, ge=0.0, le=1.0, description="jitter of careless annotators")
    careless_miss_rate: float = Field(default=0.3, ge=0.0, le=1.0, description="miss rate of careless annotators")
    careless_false_positive_rate: float = Field(default=0.1, ge=0.0, le=1.0,
                                                description="false-positive rate of careless annotators")
    skill_spread: float = Field(
        default=0.0, ge=0.0, le=2.0, description="per-annotator skill: each annotator's jitter, miss and false-"
                                                 "positive rates are multiplied by exp(skill_spread · N(0, 1))")

    @model_validator(mode="after")
    def _careless(self) -> SimulateRequest:
        if self.careless > self.annotators:
            raise ValueError(f"careless ({self.careless}) cannot exceed annotators ({self.annotators})")
        return self


class SimulateResult(BaseModel):
    annotators: list[str]
    careless: list[str] = Field(description="the careless annotators among `annotators`")
    boxes: int
    false_positives: int = Field(description="boxes drawn for a label the slice does not hold")
    stored: int
    duplicates: int
    seen_slices: int
    per_label: dict[str, int]
    per_annotator: dict[str, int]


class YoloImportResult(BaseModel):
    files: int
    empty_files: int
    boxes: int
    stored: int
    duplicates: int
    seen_slices: int
    per_class: dict[str, int]
    volumes: dict[str, int] = Field(description="case_id → boxes imported")


class CocoImportResult(BaseModel):
    images: int = Field(description="images (slices) placed on volumes")
    boxes: int
    stored: int
    duplicates: int = Field(description="boxes already stored by an earlier import of the same file")
    seen_slices: int = Field(description="(volume, slice, annotator) views recorded")
    per_label: dict[str, int]
    volumes: dict[str, int] = Field(description="case_id → boxes imported")


class CoverageLabel(BaseModel):
    annotators: int
    prompts: int


class CoverageSlice(BaseModel):
    slice: int
    labels: dict[str, CoverageLabel]
    seen_by: int


class CoverageOut(BaseModel):
    volume_id: int
    n_slices: int
    slices: list[CoverageSlice]
