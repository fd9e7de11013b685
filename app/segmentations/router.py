from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.auth.idempotency import IdempotencyDep
from app.auth.security import Anyone, Staff
from app.core.admission import heavy
from app.core.db import SessionDep
from app.core.disposition import content_disposition
from app.core.errors import Conflict, Invalid
from app.core.http import etag_matches
from app.core.pagination import LINK_HEADER_DOC, PageDep
from app.core.responses import Id, errors
from app.core.storage import get_storage
from app.datasets.repository import DatasetRepository
from app.jobs import submit
from app.jobs.states import JobStatus
from app.segmentations import figures, masks, service
from app.segmentations.jobs import KIND
from app.segmentations.models import Segmentation
from app.segmentations.repository import SegmentationRepository
from app.segmentations.schemas import DatasetSegmentationsOut, ModelOut, SegmentationCreate, SegmentationOut
from app.volumes import slices
from app.volumes.repository import VolumeRepository

router = APIRouter(tags=["segmentations"])


@router.get("/models", response_model=list[ModelOut])
def list_models(_: Anyone) -> list[ModelOut]:
    """SAM models this deployment knows, and whether each can run (checkpoint present and verified)."""
    return service.list_models()


@router.post(
    "/volumes/{volume_id}/segmentations", response_model=SegmentationOut, status_code=status.HTTP_202_ACCEPTED,
    responses=errors(400, 403, 404, 409, 422, 429),
)
def create_segmentation(
    volume_id: Id, body: SegmentationCreate, session: SessionDep, principal: Staff, idempotency: IdempotencyDep
) -> SegmentationOut | Response:
    """Segment a volume's prompts with a model; poll GET /segmentations/{id} for progress."""

    def create() -> SegmentationOut:
        volume = VolumeRepository(session).get(volume_id)
        dataset = DatasetRepository(session).get(volume.dataset_id)
        row = service.create(session, volume, dataset, body, principal)
        submit.submit(session, KIND, [row])
        return service.to_out(row)

    return idempotency.run(session, principal, status.HTTP_202_ACCEPTED, create)


@router.post(
    "/datasets/{dataset_id}/segmentations",
    response_model=DatasetSegmentationsOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(400, 403, 404, 409, 422, 429),
)
def create_dataset_segmentations(
    dataset_id: Id, body: SegmentationCreate, session: SessionDep, principal: Staff, idempotency: IdempotencyDep
) -> DatasetSegmentationsOut | Response:
    """Segment every volume of a dataset that has prompts (one job per volume)."""

    def create() -> DatasetSegmentationsOut:
        dataset = DatasetRepository(session).get(dataset_id)
        volumes = VolumeRepository(session).list_for_dataset(dataset_id)
        rows, skipped = service.create_for_dataset(session, dataset, volumes, body, principal)
        submit.submit(session, KIND, rows)
        return DatasetSegmentationsOut(ids=[r.id for r in rows], skipped=skipped)

    return idempotency.run(session, principal, status.HTTP_202_ACCEPTED, create)


@router.get("/segmentations/{segmentation_id}", response_model=SegmentationOut, responses=errors(403, 404, 422))
def get_segmentation(segmentation_id: Id, session: SessionDep, _: Staff) -> SegmentationOut:
    """Status, progress (prompted slices done/total), error and, once finished, stats and the mask URL."""
    return service.to_out(SegmentationRepository(session).get(segmentation_id))


@router.get("/volumes/{volume_id}/segmentations", response_model=list[SegmentationOut],
            responses={**LINK_HEADER_DOC, **errors(403, 404, 422)})
def list_segmentations(volume_id: Id, session: SessionDep, _: Staff, page: PageDep) -> list[SegmentationOut]:
    """Segmentations of a volume, newest (highest id) first, paginated (``limit``, ``after``, ``Link``)."""
    VolumeRepository(session).get(volume_id)
    rows = SegmentationRepository(session).page_for_volume(volume_id, page.after, page.limit)
    return [service.to_out(r) for r in page.rows(rows)]


@router.post(
    "/segmentations/{segmentation_id}/cancel",
    response_model=SegmentationOut,
    responses=errors(403, 404, 409, 422),
)
def cancel_segmentation(segmentation_id: Id, session: SessionDep, _: Staff) -> SegmentationOut:
    """Cancel: a queued job never runs; a running one stops at its next slice."""
    return service.to_out(submit.cancel(session, KIND, segmentation_id))


@router.delete(
    "/segmentations/{segmentation_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(403, 404, 409, 422)
)
def delete_segmentation(segmentation_id: Id, session: SessionDep, _: Staff) -> Response:
    """Delete a segmentation and its mask (files go once the deletion has committed). A queued one is
    canceled first; a running one, or one a queued/running export or evaluation reads → 409."""
    service.delete(session, segmentation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _finished(session: Session, segmentation_id: int) -> Segmentation:
    row = SegmentationRepository(session).get(segmentation_id)
    if row.status != JobStatus.finished or row.mask_key is None:
        raise Conflict(f"segmentation {row.id} is {row.status}: no mask yet")
    return row


@router.get(
    "/segmentations/{segmentation_id}/mask",
    response_class=Response,
    responses={
        200: {"content": {"application/gzip": {}, "application/dicom": {}},
              "description": "NIfTI label map on the image grid, or a DICOM Segmentation (format=dicom-seg)"},
        304: {"description": "Not Modified (If-None-Match matched the ETag)"},
        **errors(403, 404, 409, 422),
    },
)
def download_mask(
    segmentation_id: Id,
    request: Request,
    session: SessionDep,
    _: Staff,
    label: Annotated[str | None, Query(description="one label name → binary 0/1 mask (dicom-seg: one segment)")] = (
        None
    ),
    format: Annotated[Literal["nifti", "dicom-seg"], Query(
        description="nifti: the label map (.nii.gz); dicom-seg: a DICOM Segmentation, one segment per label "
                    "present, referencing the source DICOM series (or a synthetic one for NIfTI uploads)")] = "nifti",
) -> Response:
    """The label map (dataset label values) on the uploaded image's grid; ``?label=`` → binary mask;
    ``?format=dicom-seg`` → the same as a DICOM SEG (a label without a SNOMED CT code → 422)."""
    row = _finished(session, segmentation_id)
    assert row.mask_key is not None and row.mask_sha256 is not None
    volume = VolumeRepository(session).get(row.volume_id)
    dataset = DatasetRepository(session).get(volume.dataset_id)
    etag = f'"{row.mask_sha256}"'
    name = f"{volume.case_id}_seg{row.id}"
    value: int | None = None
    if label is not None:
        labels = dataset.labels
        if label not in labels:
            raise Invalid(f"label {label!r} is not a label of this dataset (has: {sorted(labels)})")
        value = labels[label]
        etag = f'"{row.mask_sha256[:40]}-{value}"'
        name = f"{name}_{label}"
    if format == "dicom-seg":
        inputs = json.dumps([dataset.label_codes, masks.software_version()], sort_keys=True).encode()
        codes = hashlib.sha256(inputs).hexdigest()[:12]  # the SEG also depends on the codes and crowdsam
        etag = f'"{row.mask_sha256[:32]}-dcm-{value if value is not None else "all"}-{codes}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    storage = get_storage()
    if format == "dicom-seg":
        headers["Content-Disposition"] = content_disposition(f"{name}.dcm")
        values = dict(dataset.labels) if label is None else {label: dataset.labels[label]}
        content = masks.mask_dicom_seg(storage, volume, dataset, row, values)
        return Response(content, media_type="application/dicom", headers=headers)
    headers["Content-Disposition"] = content_disposition(f"{name}.nii.gz")
    if value is not None:
        return Response(masks.binary_mask_nifti(storage, row, value), media_type="application/gzip", headers=headers)
    handle = storage.open(row.mask_key)

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/gzip", headers=headers)


@router.get(
    "/segmentations/{segmentation_id}/figure.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "montage of prompted and unprompted slices + Dice"},
        304: {"description": "Not Modified (If-None-Match matched the ETag)"},
        **errors(403, 404, 409, 422),
    },
)
@heavy  # seconds of CPU per drawing: the small gate of uploads and imports
def segmentation_figure(segmentation_id: Id, request: Request, session: SessionDep, _: Staff) -> Response:
    """One readable figure of the volume: prompted and unprompted display slices with the fused mask (fill),
    the reference (contours) and the crowd's boxes, plus per-organ Dice bars when a reference exists."""
    row = _finished(session, segmentation_id)
    volume = VolumeRepository(session).get(row.volume_id)
    etag = figures.figure_etag(row, volume)
    headers = {"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    png = figures.segmentation_figure(session, get_storage(), row, volume)
    headers["Content-Disposition"] = content_disposition(f"{volume.case_id}_seg{row.id}_figure.png")
    return Response(png, media_type="image/png", headers=headers)


@router.get(
    "/segmentations/{segmentation_id}/slices/{k}.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "display slice with the mask"},
        304: {"description": "Not Modified (If-None-Match matched the ETag)"},
        **errors(403, 404, 409, 422),
    },
)
def overlay_slice(
    segmentation_id: Id,
    k: int,
    request: Request,
    session: SessionDep,
    _: Staff,
    mode: Annotated[Literal["overlay", "mask"], Query(description="overlay: CT + colours; mask: RGBA only")] = (
        "overlay"
    ),
    labels: Annotated[str | None, Query(description="comma-separated label names to show (default all)")] = None,
    level: Annotated[float | None, Query(ge=-2000, le=5000)] = None,
    width: Annotated[float | None, Query(gt=0, le=10000)] = None,
) -> Response:
    """Display slice ``k`` (annotators' orientation) with the mask's labels coloured (app/imaging/palette)."""
    row = _finished(session, segmentation_id)
    assert row.mask_sha256 is not None
    volume = VolumeRepository(session).get(row.volume_id)
    dataset = DatasetRepository(session).get(volume.dataset_id)
    slices.check_slice(volume, k)
    shown = masks.parse_label_filter(labels, dataset.labels)
    lvl = dataset.window_level if level is None else level
    wid = dataset.window_width if width is None else width
    values = sorted(shown.values())
    window = f"-{lvl:g}-{wid:g}" if mode == "overlay" else ""
    etag = f'"{row.mask_sha256[:16]}-{k}-{mode}-{".".join(map(str, values))}{window}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    storage = get_storage()
    label_map = masks.canonical_labels(storage, volume, row)
    ct = slices.canonical_array(storage, volume.canonical_key)
    png = masks.overlay_png(ct, label_map, k, values, mode=mode, level=lvl, width=wid)
    return Response(png, media_type="image/png", headers=headers)
