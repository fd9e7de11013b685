from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from app.core.pagination import keyset
from app.core.repository import Repository
from app.volumes.models import Volume


class VolumeRepository(Repository[Volume]):
    model = Volume
    what = "volume"

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
