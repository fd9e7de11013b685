from __future__ import annotations

from fastapi import APIRouter, status

from app.core.db import SessionDep
from app.core.responses import Id, errors
from app.core.security import Anyone, Staff
from app.datasets import service
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import DatasetCreate, DatasetOut

router = APIRouter(tags=["datasets"])


@router.post(
    "/datasets",
    response_model=DatasetOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 409, 422),
)
def create_dataset(body: DatasetCreate, session: SessionDep, _: Staff) -> DatasetOut:
    """Create a dataset with its organ label schema."""
    return DatasetOut.model_validate(service.create_dataset(session, body))


@router.get("/datasets", response_model=list[DatasetOut])
def list_datasets(session: SessionDep, _: Anyone) -> list[DatasetOut]:
    """List datasets (label schemas are visible to annotators for their organ picker)."""
    return [DatasetOut.model_validate(d) for d in DatasetRepository(session).list()]


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=errors(404, 422))
def get_dataset(dataset_id: Id, session: SessionDep, _: Anyone) -> DatasetOut:
    """One dataset."""
    return DatasetOut.model_validate(DatasetRepository(session).get(dataset_id))
