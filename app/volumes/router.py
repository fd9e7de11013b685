from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, Form, Query, Request, Response, UploadFile, status
from fastapi.responses import StreamingResponse

from app.auth.security import Anyone, Staff
from app.core.admission import heavy
from app.core.db import SessionDep
from app.core.disposition import content_disposition
from app.core.errors import Invalid, NotFound
from app.core.http import etag_matches
from app.core.pagination import LINK_HEADER_DOC, PageDep
from app.core.responses import Id, errors
from app.core.storage import get_storage
from app.datasets.repository import DatasetRepository
from app.imaging import dicom
from app.volumes import service, slices
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository
from app.volumes.schemas import Split, VolumeOut

router = APIRouter(tags=["volumes"])


def volume_out(volume: Volume) -> VolumeOut:
    rows, cols = volume.canonical_shape[1], volume.canonical_shape[0]
    return VolumeOut.model_validate(
        {
            **{c: getattr(volume, c) for c in VolumeOut.model_fields if hasattr(volume, c)},
            "display_size": [cols, rows],
        }
    )


def _spool(upload: UploadFile, directory: Path, name: str) -> service.UploadedFile:
    """Copy the upload to a local file whose suffix follows its content (gzip or not)."""
    upload.file.seek(0)
    gzipped = upload.file.read(2) == b"\x1f\x8b"
    upload.file.seek(0)
    target = directory / (name + (".nii.gz" if gzipped else ".nii"))
    with target.open("wb") as out:
        while chunk := upload.file.read(1 << 20):
            out.write(chunk)
    return service.UploadedFile(target, upload.filename or "")


def _head(upload: UploadFile) -> bytes:
    upload.file.seek(0)
    head = upload.file.read(132)
    upload.file.seek(0)
    return head


def _spool_raw(upload: UploadFile, target: Path) -> service.UploadedFile:
    """Copy the upload to ``target`` as it is, 1 MiB at a time (a DICOM part or zip)."""
    upload.file.seek(0)
    with target.open("wb") as out:
        while chunk := upload.file.read(1 << 20):
            out.write(chunk)
    return service.UploadedFile(target, upload.filename or target.name)


@router.post(
    "/datasets/{dataset_id}/volumes",
    response_model=VolumeOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 403, 404, 409, 413, 422, 507),
)
@heavy
def upload_volume(
    dataset_id: Id,
    session: SessionDep,
    _: Staff,
    image: Annotated[list[UploadFile], File(description=(
        "CT volume: one .nii/.nii.gz file, or a DICOM CT series as one zip or as several 'image' parts "
        "(one file per slice)"))],
    case_id: Annotated[str, Form()],
    split: Annotated[Split, Form()] = "train",
    reference: Annotated[UploadFile | None, File(description="label map on the image's geometry")] = None,
    reference_map: Annotated[
        str | None, Form(description='JSON: source value → label name, e.g. {"1": "spleen"}')
    ] = None,
    reference_other: Annotated[
        str | None, Form(description="'background' drops reference values not in reference_map")
    ] = None,
) -> VolumeOut:
    """Upload a CT volume (and optionally its reference label map); everything is validated first.

    ``image`` is a NIfTI file (``.nii``/``.nii.gz``), or one DICOM CT series: a zip of its files or each
    slice as its own ``image`` part. A series is checked from its headers (one SeriesInstanceUID,
    Modality CT, parallel slices of one size, evenly spaced along their normal: no missing or duplicate
    slice) and converted to NIfTI as SimpleITK's ImageSeriesReader reads it (voxel (i, j, k) = column i,
    row j of the k-th slice along the normal; values × RescaleSlope + RescaleIntercept). The volume keeps
    the series' Study/Series/Frame-of-Reference UIDs; ``reference`` is then a NIfTI label map on the
    converted geometry. A single DICOM file is not a volume (422).
    """
    dataset = DatasetRepository(session).get(dataset_id)
    if reference_other not in (None, "", "background"):
        raise Invalid("reference_other: the only accepted value is 'background'")
    if reference is None and (reference_map or reference_other):
        raise Invalid("reference_map/reference_other: given without a reference file")
    options = service.ReferenceOptions(
        mapping=service.parse_reference_map(reference_map, dataset),
        other_to_background=reference_other == "background",
    )
    if not image:
        raise Invalid("image: no file given")
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = _spool(reference, Path(tmp), "reference") if reference is not None else None
        heads = [_head(part) for part in image]
        if len(image) > 1 or heads[0].startswith(dicom.ZIP_MAGIC):
            if len(image) > 1 and any(h.startswith(dicom.ZIP_MAGIC) for h in heads):
                raise Invalid("image: send a DICOM series either as one zip or as several DICOM files, not both")
            parts = Path(tmp) / "dicom"
            parts.mkdir()
            files = [_spool_raw(part, parts / f"{n:05d}") for n, part in enumerate(image)]
            volume = service.upload_dicom_volume(
                session, get_storage(), dataset, files=files, case_id=case_id, split=split,
                reference=ref_file, reference_options=options,
            )
            return volume_out(volume)
        name = (image[0].filename or "").lower()
        if not name.endswith(service.NIFTI_SUFFIXES) and heads[0][128:132] == dicom.DICOM_MAGIC:
            raise Invalid("image: a single DICOM file is not a volume; upload the whole series "
                          "(one zip, or each slice as its own 'image' part)")
        image_file = _spool(image[0], Path(tmp), "image")
        volume = service.upload_volume(
            session,
            get_storage(),
            dataset,
            image=image_file,
            case_id=case_id,
            split=split,
            reference=ref_file,
            reference_options=options,
        )
    return volume_out(volume)


@router.get("/datasets/{dataset_id}/volumes", response_model=list[VolumeOut],
            responses={**LINK_HEADER_DOC, **errors(404, 422)})
def list_volumes(dataset_id: Id, session: SessionDep, _: Anyone, page: PageDep) -> list[VolumeOut]:
    """Volumes of a dataset by id, paginated (``limit``, ``after``, ``Link``)."""
    DatasetRepository(session).get(dataset_id)
    return [volume_out(v) for v in page.rows(VolumeRepository(session).page_for_dataset(dataset_id, page.after,
                                                                                       page.limit))]


@router.get("/volumes/{volume_id}", response_model=VolumeOut, responses=errors(404, 422))
def get_volume(volume_id: Id, session: SessionDep, _: Anyone) -> VolumeOut:
    """Volume metadata: shape, spacing, orientation, number of slices."""
    return volume_out(VolumeRepository(session).get(volume_id))


@router.delete("/volumes/{volume_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(403, 404, 422))
def delete_volume(
    volume_id: Id, session: SessionDep, _: Staff, background: BackgroundTasks
) -> Response:
    """Delete a volume, its prompts, masks and files (files go once the deletion has committed)."""
    repo = VolumeRepository(session)
    volume = repo.get(volume_id)
    canonical_key = volume.canonical_key
    repo.delete(volume)
    session.commit()
    slices.forget(canonical_key)
    background.add_task(get_storage().delete_prefix, f"volumes/{volume_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/volumes/{volume_id}/slices/{k}.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "8-bit grayscale display slice"},
        304: {"description": "Not Modified (If-None-Match matched the ETag)"},
        **errors(404, 422),
    },
)
def slice_png(
    volume_id: Id,
    k: int,
    request: Request,
    session: SessionDep,
    _: Anyone,
    level: Annotated[float | None, Query(ge=-2000, le=5000)] = None,
    width: Annotated[float | None, Query(gt=0, le=10000)] = None,
) -> Response:
    """Axial slice ``k`` in display orientation (anterior up, patient right on the left), windowed."""
    volume = VolumeRepository(session).get(volume_id)
    dataset = DatasetRepository(session).get(volume.dataset_id)
    lvl = dataset.window_level if level is None else level
    wid = dataset.window_width if width is None else width
    slices.check_slice(volume, k)
    etag = f'"{volume.sha256[:16]}-{k}-{lvl:g}-{wid:g}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    png = slices.display_png(get_storage(), volume, k, lvl, wid)
    return Response(png, media_type="image/png", headers=headers)


def _stream(key: str, filename: str) -> StreamingResponse:
    handle = get_storage().open(key)

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/gzip" if filename.endswith(".gz") else "application/octet-stream",
        headers={"Content-Disposition": content_disposition(filename)},
    )


@router.get(
    "/volumes/{volume_id}/image",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}, "application/octet-stream": {}},
              "description": "the image as uploaded (.nii.gz, or .nii)"},
        **errors(403, 404, 422),
    },
)
def download_image(volume_id: Id, session: SessionDep, _: Staff) -> StreamingResponse:
    """The image exactly as uploaded."""
    volume = VolumeRepository(session).get(volume_id)
    suffix = ".nii.gz" if volume.image_key.endswith(".gz") else ".nii"
    return _stream(volume.image_key, f"{volume.case_id}{suffix}")


@router.get(
    "/volumes/{volume_id}/reference",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "the reference label map (.nii.gz)"},
        **errors(403, 404, 422),
    },
)
def download_reference(volume_id: Id, session: SessionDep, _: Staff) -> StreamingResponse:
    """The reference label map in the dataset's label values (researchers only)."""
    volume = VolumeRepository(session).get(volume_id)
    if volume.reference_key is None:
        raise NotFound(f"volume {volume_id} has no reference label map")
    return _stream(volume.reference_key, f"{volume.case_id}_reference.nii.gz")
