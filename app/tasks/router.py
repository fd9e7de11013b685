from __future__ import annotations

from fastapi import APIRouter, Response, status

from app.auth.security import Anyone
from app.core.db import SessionDep
from app.core.responses import DatasetQuery, errors
from app.tasks import service
from app.tasks.schemas import TaskOut

router = APIRouter(tags=["tasks"])


@router.get(
    "/tasks/next",
    response_model=TaskOut,
    responses={**errors(404, 422), 204: {"description": "nothing left for this annotator in the dataset"}},
)
def next_task(
    session: SessionDep, who: Anyone, dataset: DatasetQuery
) -> TaskOut | Response:
    """The slice the caller should label next, leased to them for a short time; 204 when none is left."""
    task = service.next_task(session, dataset, who)
    if task is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return task
