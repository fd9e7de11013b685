from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.exports.models import Export
from app.jobs.states import JobStatus
from app.segmentations.models import Segmentation


class ExportRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, export_id: int) -> Export:
        row = self.session.get(Export, export_id)
        if row is None:
            raise NotFound(f"export {export_id} not found")
        return row

    def add(self, export: Export) -> Export:
        self.session.add(export)
        self.session.flush()
        return export


def latest_finished_segmentation(session: Session, volume_id: int, model: str) -> Segmentation | None:
    """The newest finished segmentation of a volume with ``model`` (contracts.md)."""
    return session.scalar(
        select(Segmentation)
        .where(
            Segmentation.volume_id == volume_id,
            Segmentation.model == model,
            Segmentation.status == JobStatus.finished,
            Segmentation.mask_key.is_not(None),
        )
        .order_by(Segmentation.created_at.desc(), Segmentation.id.desc())
        .limit(1)
    )
