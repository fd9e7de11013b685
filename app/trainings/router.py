from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse

from app.auth.idempotency import IdempotencyDep
from app.auth.security import Staff
from app.core.db import SessionDep
from app.core.disposition import content_disposition
from app.core.errors import Conflict
from app.core.http import stored_file
from app.core.pagination import LINK_HEADER_DOC, PageDep
from app.core.responses import Id, errors
from app.core.storage import get_storage
from app.datasets.repository import DatasetRepository
from app.jobs import submit
from app.trainings import service
from app.trainings.jobs import KIND
from app.trainings.models import Training
from app.trainings.repository import TrainingRepository
from app.trainings.schemas import TrainingOut, TrainingRequest

router = APIRouter(tags=["trainings"])

ARCHIVE_RESPONSES: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not Modified (If-None-Match matched the ETag)"},
    **errors(403, 404, 409, 422),
}


@router.post(
    "/datasets/{dataset_id}/trainings",
    response_model=TrainingOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(400, 403, 404, 409, 422, 429),
)
def create_training(
    dataset_id: Id, body: TrainingRequest, session: SessionDep, principal: Staff, idempotency: IdempotencyDep
) -> TrainingOut | Response:
    """Queue an nnU-Net v2 training on a finished export (plan and preprocess, train, predict its test cases)."""

    def create() -> TrainingOut:
        dataset = DatasetRepository(session).get(dataset_id)
        row = service.create_training(session, dataset, body, principal)
        submit.submit(session, KIND, [row])
        return service.to_out(row)

    return idempotency.run(session, principal, status.HTTP_202_ACCEPTED, create)


@router.get("/datasets/{dataset_id}/trainings", response_model=list[TrainingOut],
            responses={**LINK_HEADER_DOC, **errors(403, 404, 422)})
def list_trainings(dataset_id: Id, session: SessionDep, _: Staff, page: PageDep) -> list[TrainingOut]:
    """Trainings of a dataset, newest (highest id) first, paginated (``limit``, ``after``, ``Link``)."""
    DatasetRepository(session).get(dataset_id)
    rows = TrainingRepository(session).page_for_dataset(dataset_id, page.after, page.limit)
    return [service.to_out(r) for r in page.rows(rows)]


@router.get("/trainings/{training_id}", response_model=TrainingOut, responses=errors(403, 404, 422))
def get_training(training_id: Id, session: SessionDep, _: Staff) -> TrainingOut:
    """Status, progress (epoch/total, phase, losses, pseudo-Dice while it runs) and, once finished, the result."""
    return service.to_out(TrainingRepository(session).get(training_id))


@router.post("/trainings/{training_id}/cancel", response_model=TrainingOut, responses=errors(403, 404, 409, 422))
def cancel_training(training_id: Id, session: SessionDep, _: Staff) -> TrainingOut:
    """Cancel: a queued training never runs; a running one stops at its next progress tick (epoch or case)."""
    return service.to_out(submit.cancel(session, KIND, training_id))


@router.delete("/trainings/{training_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses=errors(403, 404, 409, 422))
def delete_training(training_id: Id, session: SessionDep, _: Staff) -> Response:
    """Delete a training, its checkpoint and predictions (once the deletion has committed). A queued one is
    canceled first; a running one, or one a queued or running evaluation reads → 409."""
    service.delete(session, training_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/trainings/{training_id}/checkpoint",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}},
                     "description": "model.tar.gz: the nnU-Net results folder (plans, dataset.json, checkpoints)"},
               **ARCHIVE_RESPONSES},
)
def download_checkpoint(training_id: Id, request: Request, session: SessionDep, _: Staff) -> Response:
    """The trained model as a streamed ``.tar.gz`` (409 until the training has finished)."""
    row = service.finished(TrainingRepository(session).get(training_id))
    return _archive(request, row, "checkpoint")


@router.get(
    "/trainings/{training_id}/predictions",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}},
                     "description": "predictions.tar.gz: nnU-Net's output folder for the test cases "
                                    "({case}.nii.gz in the export's label values)"},
               **ARCHIVE_RESPONSES},
)
def download_predictions(training_id: Id, request: Request, session: SessionDep, _: Staff) -> Response:
    """The test cases' predictions as a streamed ``.tar.gz`` (409 until the training has finished)."""
    row = service.finished(TrainingRepository(session).get(training_id))
    return _archive(request, row, "predictions")


def _archive(request: Request, row: Training, what: Literal["checkpoint", "predictions"]) -> Response:
    """Stream one stored archive with a file name and an ``ETag``: the archive's sha256 as the worker recorded it
    (``result.model`` / ``result.predictions_archive``), else the row, size and finish time (a finished
    training's files never change)."""
    key = row.model_key if what == "checkpoint" else row.predictions_key
    if key is None:
        raise Conflict(f"training {row.id} stored no {what} archive")
    recorded = (row.result or {}).get("model" if what == "checkpoint" else "predictions_archive") or {}
    digest = recorded.get("sha256") if isinstance(recorded, dict) else None
    if isinstance(digest, str) and digest:
        etag = f'"{digest}"'
    else:  # an older row without the hash: its size and finish time (one more stat of the object)
        stamp = int(row.finished_at.timestamp() * 1000) if row.finished_at else 0
        etag = f'"training{row.id}-{what}-{get_storage().size(key)}-{stamp}"'
    name = "model" if what == "checkpoint" else "predictions"
    headers = {"Cache-Control": "private, max-age=0, must-revalidate",
               "Content-Disposition": content_disposition(f"training{row.id}_{name}.tar.gz")}
    return stored_file(key, media_type="application/gzip", etag=etag,
                       if_none_match=request.headers.get("if-none-match"), headers=headers)
