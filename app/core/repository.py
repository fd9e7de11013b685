"""The one generic repository: a session, get-or-404, add and delete for one ORM model.

Each domain repository names its model and how a missing row is called (``what``), then adds its
own queries: ``Repository[Dataset]`` with ``what = "dataset"`` answers a missing id with
``NotFound("dataset 5 not found")``. :class:`BaseRepository` leaves ``get`` out for a domain whose
``get`` answers ``None`` instead (tokens).
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy.orm import Session

from app.core.errors import NotFound

ModelT = TypeVar("ModelT")


class BaseRepository(Generic[ModelT]):
    model: ClassVar[type[Any]]
    what: ClassVar[str]

    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, row_id: int) -> ModelT | None:
        """The row with primary key ``row_id``, or None."""
        row: ModelT | None = self.session.get(self.model, row_id)
        return row

    def not_found(self, row_id: Any) -> NotFound:
        return NotFound(f"{self.what} {row_id} not found")

    def add(self, row: ModelT) -> ModelT:
        """Add ``row`` and flush, so its id (and server defaults) are set."""
        self.session.add(row)
        self.session.flush()
        return row

    def delete(self, row: ModelT) -> None:
        self.session.delete(row)
        self.session.flush()


class Repository(BaseRepository[ModelT]):
    def get(self, row_id: int) -> ModelT:
        """The row with primary key ``row_id``; ``NotFound("<what> <id> not found")`` when there is none."""
        row = self.find(row_id)
        if row is None:
            raise self.not_found(row_id)
        return row
