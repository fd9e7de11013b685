"""Queries for segmentation rows and the prompts a segmentation reads."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import distinct, func, select

from app.core.pagination import keyset
from app.core.repository import Repository
from app.prompts.models import Prompt
from app.segmentations.models import Segmentation
from app.volumes.models import Volume


class SegmentationRepository(Repository[Segmentation]):
    model = Segmentation
    what = "segmentation"

    def get(self, segmentation_id: int, *, for_update: bool = False) -> Segmentation:
        stmt = select(Segmentation).where(Segmentation.id == segmentation_id)
        if for_update:
            stmt = stmt.with_for_update()
        row = self.session.scalar(stmt.execution_options(populate_existing=True))
        if row is None:
            raise self.not_found(segmentation_id)
        return row

    def list_for_volume(self, volume_id: int) -> Sequence[Segmentation]:
        return self.session.scalars(
            select(Segmentation)
            .where(Segmentation.volume_id == volume_id)
            .order_by(Segmentation.created_at.desc(), Segmentation.id.desc())
        ).all()

    def page_for_volume(self, volume_id: int, after: int | None, limit: int) -> Sequence[Segmentation]:
        """A volume's segmentations, newest (highest id) first, after ``after`` (``limit`` + 1 rows)."""
        stmt = select(Segmentation).where(Segmentation.volume_id == volume_id)
        return self.session.scalars(keyset(stmt, Segmentation.id, after, limit, descending=True)).all()

    def prompts(self, volume_id: int, labels: Sequence[str] | None = None) -> Sequence[Prompt]:
        """The volume's prompts in a stable order (the engine's input must not depend on row order)."""
        stmt = select(Prompt).where(Prompt.volume_id == volume_id)
        if labels is not None:
            stmt = stmt.where(Prompt.label.in_(list(labels)))
        return self.session.scalars(stmt.order_by(Prompt.slice_index, Prompt.label, Prompt.annotator, Prompt.id)).all()

    def prompt_summary(self, volume_id: int, labels: Sequence[str] | None = None) -> tuple[list[str], int]:
        """(labels that have prompts, number of distinct prompted slices) without loading the prompts."""
        stmt = select(Prompt.label).distinct().where(Prompt.volume_id == volume_id)
        if labels is not None:
            stmt = stmt.where(Prompt.label.in_(list(labels)))
        used = sorted(self.session.scalars(stmt).all())
        slices = select(func.count(distinct(Prompt.slice_index))).where(Prompt.volume_id == volume_id)
        if labels is not None:
            slices = slices.where(Prompt.label.in_(list(labels)))
        return used, int(self.session.scalar(slices) or 0)

    def prompted_labels(self, volume_id: int) -> list[str]:
        return sorted(
            self.session.scalars(select(Prompt.label).distinct().where(Prompt.volume_id == volume_id)).all()
        )

    def volumes_with_prompts(self, dataset_id: int, labels: Sequence[str] | None = None) -> set[int]:
        stmt = (
            select(Prompt.volume_id)
            .distinct()
            .join(Volume, Volume.id == Prompt.volume_id)
            .where(Volume.dataset_id == dataset_id)
        )
        if labels is not None:
            stmt = stmt.where(Prompt.label.in_(list(labels)))
        return set(self.session.scalars(stmt).all())
