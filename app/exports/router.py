from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.responses import StreamingResponse

from app.auth.idempotency import IdempotencyDep
from app.auth.security import Staff
from app.core.db import SessionDep
from app.core.disposition import content_disposition
from app.core.http import stored_file
from app.core.responses import Id, errors
from app.datasets.repository import DatasetRepository
from app.exports import service
from app.exports.jobs import KIND
from app.exports.repository import ExportRepository
from app.exports.schemas import ExportCreate, ExportOut
from app.jobs import submit

router = APIRouter(tags=["exports"])


@router.post(
    "/datasets/{dataset_id}/exports",
    response_model=ExportOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(400, 403, 404, 409, 422, 429),
)
def create_export(
    dataset_id: Id, body: ExportCreate, session: SessionDep, principal: Staff, idempotency: IdempotencyDep
) -> ExportOut | Response:
    """Queue an nnU-Net v2 raw dataset export (checked completely before it is queued)."""

    def create() -> ExportOut:
        dataset = DatasetRepository(session).get(dataset_id)
        row = service.create_export(session, dataset, body, principal)
        submit.submit(session, KIND, [row])
        return service.to_out(row)

    return idempotency.run(session, principal, status.HTTP_202_ACCEPTED, create)


@router.get("/exports/{export_id}", response_model=ExportOut, responses=errors(403, 404, 422))
def get_export(export_id: Id, session: SessionDep, _: Staff) -> ExportOut:
    """Status, file list with sizes and sha256, and dataset.json of an export."""
    return service.to_out(ExportRepository(session).get(export_id))


@router.post("/exports/{export_id}/cancel", response_model=ExportOut, responses=errors(403, 404, 409, 422))
def cancel_export(export_id: Id, session: SessionDep, _: Staff) -> ExportOut:
    """Cancel: a queued export never runs; a running one stops at its next case (nothing half-written stays)."""
    return service.to_out(submit.cancel(session, KIND, export_id))


@router.delete("/exports/{export_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(403, 404, 409, 422))
def delete_export(export_id: Id, session: SessionDep, _: Staff) -> Response:
    """Delete an export and its files (once the deletion has committed). A queued one is canceled first;
    a running one → 409 (cancel it, then delete it), as is one a queued or running training reads."""
    service.delete(session, export_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/exports/{export_id}/archive",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "the nnU-Net raw dataset as .tar.gz"},
        **errors(403, 404, 409, 422),
    },
)
def download_archive(export_id: Id, session: SessionDep, _: Staff) -> Response:
    """The export as a streamed ``.tar.gz`` (409 while it is still running)."""
    row = ExportRepository(session).get(export_id)
    key = service.archive_key(row)
    folder = (row.result or {}).get("folder", f"export{row.id}")
    return stored_file(key, media_type="application/gzip",
                       headers={"Content-Disposition": content_disposition(f"{folder}.tar.gz")})
