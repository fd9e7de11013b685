from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.core.pagination import keyset
from app.volumes.models import Volume


class VolumeRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, volume_id: int) -> Volume:
        row = self.session.get(Volume, volume_id)
        if row is None:
            raise NotFound(f"volume {volume_id} not found")
        return row

    def by_case(self, dataset_id: int, case_id: str) -> Volume | None:
        return self.session.scalar(
            select(Volume).where(Volume.dataset_id == dataset_id, Volume.case_id == case_id)
        )

    def list_for_dataset(self, dataset_id: int) -> Sequence[Volume]:
        return self.session.scalars(
            select(Volume).where(Volume.dataset_id == dataset_id).order_by(Volume.id)
        ).all()

    def page_for_dataset(self, dataset_id: int, after: int | None, limit: int) -> Sequence[Volume]:
        """A dataset's volumes by id after ``after`` (``limit`` + 1 rows: see :func:`app.core.pagination.keyset`)."""
        stmt = select(Volume).where(Volume.dataset_id == dataset_id)
        return self.session.scalars(keyset(stmt, Volume.id, after, limit)).all()

    def add(self, volume: Volume) -> Volume:
        self.session.add(volume)
        self.session.flush()
        return volume

    def delete(self, volume: Volume) -> None:
        self.session.delete(volume)
        self.session.flush()
