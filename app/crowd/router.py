from __future__ import annotations

from fastapi import APIRouter

from app.auth.security import Staff
from app.core.db import SessionDep
from app.core.responses import Id, errors
from app.core.storage import get_storage
from app.crowd import service
from app.crowd.schemas import AnnotatorOut
from app.datasets.repository import DatasetRepository

router = APIRouter(tags=["crowd"])


@router.get("/datasets/{dataset_id}/annotators", response_model=list[AnnotatorOut], responses=errors(403, 404, 422))
def list_annotators(dataset_id: Id, session: SessionDep, _: Staff) -> list[AnnotatorOut]:
    """Each annotator's work and reliability over the whole dataset.

    Sensitivity/specificity: Dawid–Skene over every (slice, label) vote of the dataset — an annotator
    who saw a slice and drew nothing for a label votes "absent". These are the weights of
    ``fusion="weighted"``. Owners and admins only (annotators never see each other's scores)."""
    dataset = DatasetRepository(session).get(dataset_id)
    return service.annotators(session, get_storage(), dataset)
