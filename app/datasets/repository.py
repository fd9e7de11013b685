from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, select

from app.core.pagination import keyset
from app.core.repository import Repository
from app.datasets.models import Dataset


class DatasetRepository(Repository[Dataset]):
    model = Dataset
    what = "dataset"

    def by_name(self, name: str) -> Dataset | None:
        return self.session.scalar(select(Dataset).where(Dataset.name == name))

    def list(self, only: Select[Any] | None = None) -> Sequence[Dataset]:
        """Every dataset, or those whose id ``only`` (a subquery of ids) selects."""
        query = select(Dataset).order_by(Dataset.id)
        if only is not None:
            query = query.where(Dataset.id.in_(only))
        return self.session.scalars(query).all()

    def page(self, after: int | None, limit: int, only: Select[Any] | None = None) -> Sequence[Dataset]:
        """Like :meth:`list`, one keyset page: ids after ``after``, ``limit`` + 1 rows (see app.core.pagination)."""
        query = select(Dataset)
        if only is not None:
            query = query.where(Dataset.id.in_(only))
        return self.session.scalars(keyset(query, Dataset.id, after, limit)).all()
