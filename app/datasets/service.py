from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict
from app.datasets.models import Dataset
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import DatasetCreate


def create_dataset(session: Session, body: DatasetCreate) -> Dataset:
    repo = DatasetRepository(session)
    if repo.by_name(body.name) is not None:
        raise Conflict(f"a dataset named {body.name!r} already exists")
    dataset = Dataset(
        name=body.name,
        labels=body.labels,
        prompt_classes=body.prompt_classes,
        window_level=body.window.level,
        window_width=body.window.width,
    )
    try:
        with session.begin_nested():  # a concurrent request may take the name between check and insert
            return repo.add(dataset)
    except IntegrityError as exc:
        raise Conflict(f"a dataset named {body.name!r} already exists") from exc
