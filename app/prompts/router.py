from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status

from app.auth.security import Anyone, Staff
from app.core.admission import heavy
from app.core.db import SessionDep
from app.core.disposition import content_disposition
from app.core.errors import PayloadTooLarge
from app.core.responses import BigId, Id, errors
from app.core.storage import get_storage
from app.datasets.repository import DatasetRepository
from app.prompts import coco, coco_service, service, simulation_service, yolo_service
from app.prompts.repository import PromptFilter
from app.prompts.schemas import (
    CocoImportResult,
    CoverageOut,
    PostResult,
    PromptBatch,
    PromptPage,
    SimulateRequest,
    SimulateResult,
    YoloImportResult,
)
from app.prompts.yolo import MAX_TOTAL_BYTES
from app.volumes.repository import VolumeRepository

router = APIRouter(tags=["prompts"])


@router.post(
    "/volumes/{volume_id}/prompts",
    response_model=PostResult,
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 404, 409, 422),
)
def post_prompts(volume_id: Id, body: PromptBatch, session: SessionDep, who: Anyone) -> PostResult:
    """Store boxes/points (display pixels) and seen slices; all-or-nothing, idempotent per client_id."""
    volume = VolumeRepository(session).get(volume_id)
    dataset = DatasetRepository(session).get(volume.dataset_id)
    return service.post_prompts(session, volume, dataset, who, body)


@router.get("/volumes/{volume_id}/prompts", response_model=PromptPage, responses=errors(403, 404, 422))
def list_prompts(
    volume_id: Id,
    session: SessionDep,
    who: Anyone,
    slice: Annotated[int | None, Query(ge=0)] = None,
    label: str | None = None,
    annotator: str | None = None,
    kind: Literal["box", "point"] | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> PromptPage:
    """A volume's prompts, filtered and paginated (annotators see only their own)."""
    volume = VolumeRepository(session).get(volume_id)
    f = PromptFilter(slice=slice, label=label, annotator=annotator, kind=kind)
    return service.list_prompts(session, volume, who, f, limit, offset)


@router.delete("/prompts/{prompt_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(403, 404, 422))
def delete_prompt(prompt_id: BigId, session: SessionDep, who: Anyone) -> Response:
    """Delete a prompt (annotators: only their own)."""
    service.delete_prompt(session, prompt_id, who)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/volumes/{volume_id}/coverage", response_model=CoverageOut, responses=errors(404, 422))
def coverage(volume_id: Id, session: SessionDep, _: Anyone) -> CoverageOut:
    """Per slice and label: distinct annotators and prompts; per slice: annotators who saw it."""
    return service.coverage(session, VolumeRepository(session).get(volume_id))


@router.post(
    "/datasets/{dataset_id}/prompts/yolo", response_model=YoloImportResult, status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 404, 409, 413, 422),
)
@heavy
def import_yolo(
    dataset_id: Id,
    session: SessionDep,
    who: Staff,
    files: Annotated[list[UploadFile], File(description="a zip and/or img{CASE}-slice{ZZZ}.txt files")],
    annotator: Annotated[str, Form(description="whose prompts these are")],
    convention: Annotated[Literal["display", "seed"], Form(description="PNG frame of the files")] = "display",
) -> YoloImportResult:
    """Import OpenLabeling/YOLO prompt files; any bad file or line → 422 listing file:line, nothing stored."""
    dataset = DatasetRepository(session).get(dataset_id)
    uploads = []
    for upload in files:
        data = upload.file.read(MAX_TOTAL_BYTES + 1)
        if len(data) > MAX_TOTAL_BYTES:
            raise PayloadTooLarge(f"{upload.filename}: larger than {MAX_TOTAL_BYTES} bytes")
        uploads.append((upload.filename or "upload", data))
    return yolo_service.import_yolo(session, dataset, uploads, annotator, convention, who)


@router.get(
    "/volumes/{volume_id}/prompts.yolo",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "zip of YOLO prompt files"},
        **errors(403, 404, 422),
    },
)
def export_yolo(
    volume_id: Id,
    session: SessionDep,
    _: Staff,
    convention: Literal["display", "seed"] = "display",
    annotator: str | None = None,
) -> Response:
    """The volume's boxes as OpenLabeling/YOLO files (empty files for seen-but-empty slices)."""
    volume = VolumeRepository(session).get(volume_id)
    dataset = DatasetRepository(session).get(volume.dataset_id)
    data = yolo_service.export_yolo(session, volume, dataset, convention, annotator)
    name = f"{volume.case_id}_prompts_{convention}.zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": content_disposition(name)})


@router.post(
    "/datasets/{dataset_id}/prompts/coco", response_model=CocoImportResult, status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 404, 409, 413, 422),
)
@heavy
def import_coco(
    dataset_id: Id,
    session: SessionDep,
    who: Staff,
    file: Annotated[UploadFile, File(description="one COCO JSON file (boxes in display pixels)")],
    annotator: Annotated[str | None, Form(description="whose boxes these are, unless an annotation names its "
                                                      "annotator in \"crowdsam\": {\"annotator\"}")] = None,
) -> CocoImportResult:
    """Import COCO boxes; any bad image or annotation → 422 listing where, nothing stored."""
    dataset = DatasetRepository(session).get(dataset_id)
    data = file.file.read(coco.MAX_BYTES + 1)
    if len(data) > coco.MAX_BYTES:
        raise PayloadTooLarge(f"{file.filename}: larger than {coco.MAX_BYTES} bytes")
    return coco_service.import_coco(session, dataset, data, annotator, who)


@router.get(
    "/volumes/{volume_id}/prompts.coco.json",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}}, "description": "COCO document of the volume's boxes"},
        **errors(403, 404, 422),
    },
)
def export_coco(volume_id: Id, session: SessionDep, _: Staff, annotator: str | None = None) -> Response:
    """The volume's boxes as COCO JSON (display pixels; seen slices as images); re-importable."""
    volume = VolumeRepository(session).get(volume_id)
    dataset = DatasetRepository(session).get(volume.dataset_id)
    document = coco_service.export_coco(session, volume, dataset, annotator)
    return Response(json.dumps(document, separators=(",", ":")), media_type="application/json",
                    headers={"Content-Disposition": content_disposition(f"{volume.case_id}_prompts.coco.json")})


@router.post(
    "/volumes/{volume_id}/prompts/simulate", response_model=SimulateResult, status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 404, 409, 422),
)
@heavy
def simulate(volume_id: Id, body: SimulateRequest, session: SessionDep, who: Staff) -> SimulateResult:
    """Simulate a crowd from the volume's reference (one box per connected 2D part by default)."""
    volume = VolumeRepository(session).get(volume_id)
    dataset = DatasetRepository(session).get(volume.dataset_id)
    return simulation_service.simulate_for_volume(session, get_storage(), volume, dataset, body, who)
