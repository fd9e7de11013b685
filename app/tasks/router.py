from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.auth.security import Anyone
from app.core.db import SessionDep
from app.core.responses import DatasetQuery, errors
from app.tasks import service
from app.tasks.schemas import TaskOut

router = APIRouter(tags=["tasks"])


@router.get(
    "/tasks/next",
    response_model=TaskOut,
    response_model_exclude_unset=True,  # `next` only appears when asked for (?ahead=1)
    responses={**errors(404, 422), 204: {"description": "nothing left for this annotator in the dataset"}},
)
def next_task(
    session: SessionDep, who: Anyone, dataset: DatasetQuery,
    ahead: Annotated[int, Query(ge=0, le=1, description="1: also lease the task after this one, as `next`")] = 0,
) -> TaskOut | Response:
    """The slice the caller should label next, leased to them for a short time; 204 when none is left.

    With ``ahead=1`` the slice after it is leased too and returned as ``next`` (its embedding can load early).
    """
    task = service.next_task(session, dataset, who, ahead)
    if task is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return task
