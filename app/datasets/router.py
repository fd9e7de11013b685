from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.auth.security import Anyone, Staff
from app.core.db import SessionDep
from app.core.pagination import LINK_HEADER_DOC, PageDep
from app.core.responses import Id, errors
from app.datasets import service
from app.datasets.access import member_dataset_ids
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import DatasetCreate, DatasetOut, DatasetUpdate, MemberOut

router = APIRouter(tags=["datasets"])


@router.post(
    "/datasets",
    response_model=DatasetOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 409, 422),
)
def create_dataset(body: DatasetCreate, session: SessionDep, principal: Staff) -> DatasetOut:
    """Create a dataset with its organ label schema; the creating researcher owns it."""
    return DatasetOut.model_validate(service.create_dataset(session, body, principal))


@router.get("/datasets", response_model=list[DatasetOut], responses={**LINK_HEADER_DOC, **errors(422)})
def list_datasets(session: SessionDep, principal: Anyone, page: PageDep) -> list[DatasetOut]:
    """The datasets the caller is a member of (admins: all); label schemas feed the annotators' organ picker.

    Paginated by id (``limit``, ``after``; ``Link: rel="next"`` while more exist)."""
    rows = DatasetRepository(session).page(page.after, page.limit, member_dataset_ids(session, principal))
    return [DatasetOut.model_validate(d) for d in page.rows(rows)]


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=errors(404, 422))
def get_dataset(dataset_id: Id, session: SessionDep, _: Anyone) -> DatasetOut:
    """One dataset."""
    return DatasetOut.model_validate(DatasetRepository(session).get(dataset_id))


@router.patch("/datasets/{dataset_id}", response_model=DatasetOut, responses=errors(400, 403, 404, 422))
def update_dataset(dataset_id: Id, body: DatasetUpdate, session: SessionDep, _: Staff) -> DatasetOut:
    """Change a dataset's task policy (`tasks`: min/max views per slice, agreement threshold, gold rate)."""
    dataset = service.update_dataset(session, DatasetRepository(session).get(dataset_id), body)
    return DatasetOut.model_validate(dataset)


@router.get("/datasets/{dataset_id}/members", response_model=list[MemberOut], responses=errors(403, 404, 422))
def list_members(dataset_id: Id, session: SessionDep, _: Staff) -> list[MemberOut]:
    """Who may use the dataset: its owners (researchers) and annotators."""
    return service.members(session, DatasetRepository(session).get(dataset_id))


@router.put("/datasets/{dataset_id}/members/{name}", response_model=MemberOut, responses=errors(403, 404, 422))
def put_member(dataset_id: Id, name: Annotated[str, Path(max_length=200)], session: SessionDep, _: Staff) -> MemberOut:
    """Add a token by name: a researcher becomes an owner, an annotator may label (idempotent)."""
    return service.put_member(session, DatasetRepository(session).get(dataset_id), name)


@router.delete("/datasets/{dataset_id}/members/{name}", status_code=status.HTTP_204_NO_CONTENT,
               responses=errors(403, 404, 409, 422))
def remove_member(dataset_id: Id, name: Annotated[str, Path(max_length=200)], session: SessionDep,
                  _: Staff) -> Response:
    """Take a token's access away (within ``CROWDSAM_TOKEN_CACHE_S`` in other API processes)."""
    service.remove_member(session, DatasetRepository(session).get(dataset_id), name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
