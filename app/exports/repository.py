from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.repository import Repository
from app.exports.models import Export
from app.jobs.states import JobStatus
from app.segmentations.models import Segmentation


class ExportRepository(Repository[Export]):
    model = Export
    what = "export"


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
