"""Dataset-wide crowd votes from the database: who saw which slice, who drew which label where."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, func, or_, select
from sqlalchemy.orm import Session

from app.jobs.states import JobStatus
from app.prompts.models import Prompt, SliceView
from app.segmentations.models import Segmentation
from app.volumes.models import Volume


class CrowdRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def views(self, dataset_id: int) -> Sequence[Row[int, int, str]]:
        """(volume, slice, annotator) of every slice view of the dataset."""
        return self.session.execute(
            select(SliceView.volume_id, SliceView.slice_index, SliceView.annotator)
            .join(Volume, Volume.id == SliceView.volume_id).where(Volume.dataset_id == dataset_id)
        ).all()

    def drawn(self, dataset_id: int) -> Sequence[Row[int, int, str, str, int]]:
        """(volume, slice, annotator, label, boxes) for every label an annotator marked on a slice: a
        box or a positive point says "present"."""
        return self.session.execute(
            select(Prompt.volume_id, Prompt.slice_index, Prompt.annotator, Prompt.label,
                   func.count().filter(Prompt.kind == "box"))
            .join(Volume, Volume.id == Prompt.volume_id)
            .where(Volume.dataset_id == dataset_id, or_(Prompt.kind == "box", Prompt.positive.is_not(False)))
            .group_by(Prompt.volume_id, Prompt.slice_index, Prompt.annotator, Prompt.label)
        ).all()

    def boxes(self, volume_id: int) -> Sequence[Row[int, str, str, float, float, float, float]]:
        """(slice, annotator, label, x0, y0, x1, y1) of a volume's boxes."""
        return self.session.execute(
            select(Prompt.slice_index, Prompt.annotator, Prompt.label, Prompt.x0, Prompt.y0, Prompt.x1, Prompt.y1)
            .where(Prompt.volume_id == volume_id, Prompt.kind == "box")
        ).all()  # type: ignore[return-value]

    def reference_volumes(self, dataset_id: int) -> Sequence[Volume]:
        return self.session.scalars(
            select(Volume).where(Volume.dataset_id == dataset_id, Volume.reference_key.is_not(None))
            .order_by(Volume.id)
        ).all()

    def latest_finished_stats(self, dataset_id: int) -> list[dict[str, Any]]:
        """Stats of the newest finished segmentation of each volume of the dataset."""
        rows = self.session.execute(
            select(Segmentation.stats).join(Volume, Volume.id == Segmentation.volume_id)
            .where(Volume.dataset_id == dataset_id, Segmentation.status == JobStatus.finished,
                   Segmentation.mask_key.is_not(None))
            .distinct(Segmentation.volume_id).order_by(Segmentation.volume_id, Segmentation.id.desc())
        ).scalars().all()
        return [dict(r) for r in rows if r]
