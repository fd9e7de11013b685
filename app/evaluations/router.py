from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.auth.idempotency import Idempotency, KeyHeader, canonical_json, fingerprint
from app.auth.security import Principal, Staff
from app.core.admission import heavy
from app.core.db import SessionDep
from app.core.disposition import content_disposition
from app.core.errors import Invalid
from app.core.responses import Id, errors
from app.core.storage import get_storage
from app.datasets.access import check_member
from app.datasets.repository import DatasetRepository
from app.evaluations import service
from app.evaluations.jobs import KIND
from app.evaluations.models import Evaluation
from app.evaluations.repository import EvaluationRepository
from app.evaluations.schemas import (
    CompareRequest,
    EvaluationFromJson,
    EvaluationFromSegmentation,
    EvaluationFromTraining,
    EvaluationOut,
)
from app.jobs import submit
from app.trainings.repository import TrainingRepository

router = APIRouter(tags=["evaluations"])
JSON_BODY: TypeAdapter[EvaluationFromSegmentation | EvaluationFromTraining] = TypeAdapter(EvaluationFromJson)

REQUEST_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [EvaluationFromSegmentation.model_json_schema(),
                                                      EvaluationFromTraining.model_json_schema()]}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["predictions"],
                    "properties": {
                        "predictions": {"type": "string", "format": "binary",
                                        "description": "zip or tar.gz of {CASE}.nii.gz (nnU-Net output folder)"},
                        "label_values": {"type": "string", "default": "dataset",
                                         "description": "'dataset' or 'export:<id>' (consecutive export values)"},
                        "nsd_tolerance_mm": {"type": "number", "default": 2.0},
                    },
                }
            },
        },
    }
}


@router.post(
    "/datasets/{dataset_id}/evaluations",
    response_model=EvaluationOut,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=REQUEST_BODY_DOC,
    responses=errors(400, 403, 404, 409, 413, 422, 429, 507),
)
@heavy
async def create_evaluation(dataset_id: Id, request: Request, session: SessionDep, principal: Staff,
                            key: KeyHeader = None) -> EvaluationOut | Response:
    """Queue an evaluation of a model's segmentations or a training's predictions (JSON), or of uploaded
    predictions (multipart)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        # The token (and dataset) checks may have queried: end that read-only transaction, so no pooled
        # connection sits idle in transaction while a slow client sends the archive (the next query opens one).
        if session.in_transaction():
            await run_in_threadpool(session.commit)
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("predictions")
        if not isinstance(upload, UploadFile):
            raise Invalid("predictions: attach the archive as the multipart file field 'predictions'")
        label_values = str(form.get("label_values") or "dataset")
        try:
            tolerance = float(str(form.get("nsd_tolerance_mm") or 2.0))
        except ValueError as exc:
            raise Invalid("nsd_tolerance_mm: must be a number") from exc
        with tempfile.TemporaryDirectory(prefix="crowdsam-upload-") as tmp:
            archive = Path(tmp) / "predictions.archive"
            digest = hashlib.sha256()
            with archive.open("wb") as out:
                while chunk := await upload.read(1 << 20):
                    await run_in_threadpool(_write_hashed, out, digest, chunk)  # never block the event loop
            # A retry sends another multipart boundary: the fingerprint is the fields and the file's content.
            idempotency = Idempotency(key, fingerprint(request.method, request.url.path, b"multipart",
                                                       label_values.encode(), repr(tolerance).encode(),
                                                       digest.hexdigest().encode()))
            answer = await run_in_threadpool(idempotency.run, session, principal, status.HTTP_202_ACCEPTED, lambda: (
                service.to_out(_create_upload(session, dataset_id, archive, label_values, tolerance, principal))))
    elif content_type.startswith("application/json"):
        raw = await request.body()
        try:
            body = JSON_BODY.validate_json(raw)
        except ValidationError as exc:
            raise Invalid([{k: e[k] for k in ("loc", "msg", "type")} for e in exc.errors()]) from exc
        idempotency = Idempotency(key, fingerprint(request.method, request.url.path, canonical_json(raw)))
        answer = await run_in_threadpool(idempotency.run, session, principal, status.HTTP_202_ACCEPTED, lambda: (
            service.to_out(_create_from_json(session, dataset_id, body, principal))))
    else:
        raise Invalid("send JSON {'source': 'segmentation' | 'training', ...} or multipart/form-data with "
                      "'predictions'")
    return answer


def _write_hashed(out: IO[bytes], digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    out.write(chunk)


def _submit(session: SessionDep, row: Evaluation) -> Evaluation:
    submit.submit(session, KIND, [row])
    return row


def _create_from_json(session: SessionDep, dataset_id: int,
                      body: EvaluationFromSegmentation | EvaluationFromTraining, principal: Principal) -> Evaluation:
    dataset = DatasetRepository(session).get(dataset_id)
    if isinstance(body, EvaluationFromTraining):
        return _submit(session, service.create_from_training(session, dataset, body, principal))
    return _submit(session, service.create_from_segmentation(session, dataset, body, principal))


def _create_upload(session: SessionDep, dataset_id: int, archive: Path, label_values: str, tolerance: float,
                   principal: Principal) -> Evaluation:
    dataset = DatasetRepository(session).get(dataset_id)
    row = service.create_from_upload(session, get_storage(), dataset, archive, label_values=label_values,
                                     nsd_tolerance_mm=tolerance, principal=principal)
    return _submit(session, row)


@router.post("/evaluations/compare", responses=errors(400, 403, 404, 409, 422))
def compare_evaluations(body: CompareRequest, session: SessionDep, principal: Staff) -> dict[str, Any]:
    """Paired Wilcoxon signed-rank test (per label and pooled) with n and rank-biserial effect size, of two
    evaluations (``a``, ``b``) or of two trainings' newest finished evaluations (``training_a``, ``training_b``);
    the answer names the evaluations (and trainings) compared."""
    if body.training_a is not None and body.training_b is not None:
        trainings = [TrainingRepository(session).get(i) for i in (body.training_a, body.training_b)]
        for training in trainings:
            check_member(session, principal, training.dataset_id, "training", training.id)
        a, b = (service.newest_training_evaluation(session, t) for t in trainings)
        return service.compare(session, a, b, body.metric, (trainings[0].id, trainings[1].id))
    assert body.a is not None and body.b is not None  # CompareRequest: exactly one of the two forms
    evaluations = [EvaluationRepository(session).get(i) for i in (body.a, body.b)]
    for evaluation in evaluations:
        check_member(session, principal, evaluation.dataset_id, "evaluation", evaluation.id)
    return service.compare(session, evaluations[0], evaluations[1], body.metric)


@router.get("/evaluations/{evaluation_id}", response_model=EvaluationOut, responses=errors(403, 404, 422))
def get_evaluation(evaluation_id: Id, session: SessionDep, _: Staff) -> EvaluationOut:
    """Status and, once finished, every metric per case and label."""
    return service.to_out(EvaluationRepository(session).get(evaluation_id))


@router.post(
    "/evaluations/{evaluation_id}/cancel", response_model=EvaluationOut, responses=errors(403, 404, 409, 422)
)
def cancel_evaluation(evaluation_id: Id, session: SessionDep, _: Staff) -> EvaluationOut:
    """Cancel: a queued evaluation never runs; a running one stops at its next case."""
    return service.to_out(submit.cancel(session, KIND, evaluation_id))


@router.delete(
    "/evaluations/{evaluation_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(403, 404, 409, 422)
)
def delete_evaluation(evaluation_id: Id, session: SessionDep, _: Staff) -> Response:
    """Delete an evaluation, its uploaded predictions and report (once the deletion has committed). A queued
    one is canceled first; a running one → 409 (cancel it, then delete it)."""
    submit.delete(session, KIND, evaluation_id, lambda row: [f"evaluations/{row.id}"])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/evaluations/{evaluation_id}/summary.json", responses=errors(403, 404, 409, 422))
def get_summary(evaluation_id: Id, session: SessionDep, _: Staff) -> JSONResponse:
    """nnU-Net-style ``summary.json``: metric_per_case, mean and foreground_mean (label values as keys)."""
    result = service.finished_result(EvaluationRepository(session).get(evaluation_id))
    return JSONResponse(result["summary"], headers={
        "Content-Disposition": content_disposition(f"evaluation{evaluation_id}_summary.json", "inline")})


@router.get(
    "/evaluations/{evaluation_id}/report",
    response_class=Response,  # not HTMLResponse: its media type would be documented for the JSON errors too
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "the HTML report"},
        **errors(403, 404, 409, 422),
    },
)
def get_report(evaluation_id: Id, session: SessionDep, _: Staff) -> HTMLResponse:
    """HTML report: tables and box plots (PNG embedded), per slice beside per volume Dice."""
    row = EvaluationRepository(session).get(evaluation_id)
    result = service.finished_result(row)
    return HTMLResponse(get_storage().read_bytes(result["report_key"]).decode("utf-8"))
