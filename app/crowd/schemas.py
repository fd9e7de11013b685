from __future__ import annotations

from pydantic import BaseModel, Field


class AnnotatorOut(BaseModel):
    """One annotator of a dataset: what they did and how reliable the crowd's votes say they are."""

    annotator: str
    boxes: int = Field(description="boxes drawn for the dataset's labels")
    slices_seen: int = Field(description="slices seen (a view record or a prompt)")
    votes: int = Field(description="(slice, label) votes: every label of every slice seen")
    present_votes: int = Field(description="votes 'present' (a box or positive point for the label)")
    sensitivity: float = Field(description="Dawid–Skene estimate over the dataset: P(present vote | organ there)")
    specificity: float = Field(description="Dawid–Skene estimate over the dataset: P(absent vote | organ absent)")
    agreement: float | None = Field(
        description="mean Dice of the annotator's mask with the fused mask over (slice, label) items of each "
                    "volume's newest finished segmentation; null before any")
    agreement_items: int
    reference_box_dice: float | None = Field(
        description="mean Dice between the annotator's boxes and the reference's tight boxes (rectangles) on "
                    "slices they saw of volumes with a reference; null where no reference exists")
    reference_items: int
