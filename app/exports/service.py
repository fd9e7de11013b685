"""Export requests: every check runs before a row exists; the job does the writing.

A request is refused (422) when nnU-Net would refuse the result or when labels are missing:
reserved dataset numbers, bad folder names, a train case without a reference (label_source
reference) or without a finished segmentation of the model (label_source segmentation), and, with
``mask_formats`` 'dicom-seg', a dataset label without a coded concept (built-in or ``label_codes``).
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.errors import Conflict, Invalid
from app.datasets.models import Dataset
from app.exports.jobs import KIND, ExportCase, ExportParams
from app.exports.models import Export
from app.exports.repository import ExportRepository, latest_finished_segmentation
from app.exports.schemas import DATASET_NAME_PATTERN, ExportCreate, ExportFile, ExportOut
from app.imaging import dicom_seg
from app.jobs import submit
from app.jobs.states import JobStatus
from app.jobs.submit import ACTIVE, stopping
from app.segmentations import registry
from app.volumes.repository import VolumeRepository

DEFAULT_MODEL = "litemedsam"


def folder_name_for(dataset: Dataset, requested: str | None) -> str:
    """The ``Name`` of ``DatasetXXX_Name``: as requested (validated) or the dataset's name sanitised."""
    if requested is not None:
        if not re.fullmatch(DATASET_NAME_PATTERN, requested):
            raise Invalid(
                f"dataset_name {requested!r}: use 1-64 letters, digits, '_' or '-', starting alphanumeric"
            )
        return requested
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", dataset.name).strip("_-")[:64]
    return cleaned or f"dataset{dataset.id}"


def create_export(session: Session, dataset: Dataset, body: ExportCreate, principal: Principal) -> Export:
    """Validate and add a queued export row (flushed; the router submits it, it is enqueued after the commit)."""
    name = folder_name_for(dataset, body.dataset_name)
    volumes = VolumeRepository(session).list_for_dataset(dataset.id)
    train = [v for v in volumes if v.split == "train"]
    test = [v for v in volumes if v.split == "test"] if body.include_test else []
    if not train:
        raise Invalid(f"dataset {dataset.id} has no train cases: nnU-Net needs at least one labelled case")
    model: str | None = None
    cases: list[ExportCase] = []
    if body.label_source == "reference":
        if body.model is not None:
            raise Invalid("model: only used with label_source 'segmentation'")
        if body.unprompted == "ignore":
            raise Invalid(
                "unprompted 'ignore' needs label_source 'segmentation' (a reference has no unprompted slices)"
            )
        missing = [v.case_id for v in train if not v.has_reference]
        if missing:
            raise Invalid(f"label_source 'reference': train cases without a reference map: {missing}")
        cases = [ExportCase(volume_id=v.id, case_id=v.case_id, split="train") for v in train]
    else:
        model = body.model or DEFAULT_MODEL
        if model not in registry.MODEL_NAMES:
            raise Invalid(f"unknown model {model!r} (known: {', '.join(registry.MODEL_NAMES)})")
        missing, partial = [], []
        for v in train:
            seg = latest_finished_segmentation(session, v.id, model)
            if seg is None:
                missing.append(v.case_id)
                continue
            covered = set(seg.labels) if seg.labels is not None else set(dataset.labels)
            lacking = sorted(set(dataset.labels) - covered)
            if lacking:
                partial.append(f"{v.case_id} (segmentation {seg.id} lacks {lacking})")
            cases.append(ExportCase(volume_id=v.id, case_id=v.case_id, split="train", segmentation_id=seg.id))
        if missing:
            raise Invalid(f"no finished {model!r} segmentation for train cases {missing}: segment them first")
        if partial:
            raise Invalid(f"segmentations must cover every label of the dataset: {'; '.join(partial)}")
    cases += [ExportCase(volume_id=v.id, case_id=v.case_id, split="test") for v in test]
    if "dicom-seg" in body.mask_formats:
        try:  # any label may occur in a case: every label needs a code
            dicom_seg.resolve_codes(list(dataset.labels), dataset.label_codes)
        except dicom_seg.MissingLabelCodes as exc:
            raise Invalid(f"mask_formats 'dicom-seg': {exc}") from exc
    params = ExportParams(
        **{**body.model_dump(), "dataset_name": name, "model": model},
        folder=f"Dataset{body.dataset_number:03d}_{name}",
        cases=cases,
    )
    row = ExportRepository(session).add(
        Export(
            dataset_id=dataset.id,
            format=body.format,
            params=params.model_dump(mode="json"),
            status=JobStatus.queued,
            progress={"done": 0, "total": len(cases)},
            attempts=0,
            created_by=principal.name,
        )
    )
    session.flush()
    return row


def delete(session: Session, export_id: int) -> None:
    """Delete an export and (after the commit) its files; see :func:`app.jobs.submit.delete`.

    Refused (409) while a queued or running training reads its files; finished trainings keep their
    artefacts (their ``params`` keep the export's id)."""
    from app.trainings.models import Training  # trainings build on exports: imported where it is needed

    user = session.scalar(select(Training.id).where(Training.export_id == export_id,
                                                    Training.status.in_(ACTIVE)).limit(1))
    if user is not None:
        raise Conflict(f"export {export_id} is used by training {user}, which has not finished: "
                       "wait for it or cancel it first")
    submit.delete(session, KIND, export_id, lambda row: [f"exports/{row.id}"])


def archive_key(row: Export) -> str:
    if row.status != JobStatus.finished or row.archive_key is None:
        raise Conflict(f"export {row.id} is {row.status}: the archive exists once the export has finished")
    return row.archive_key


def to_out(row: Export) -> ExportOut:
    result = row.result or {}
    return ExportOut(
        id=row.id,
        dataset_id=row.dataset_id,
        format=row.format,
        status=row.status,
        params=row.params,
        progress=row.progress or {},
        error=row.error,
        attempts=row.attempts,
        cancel_requested=stopping(KIND, row),
        created_by=row.created_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        folder=result.get("folder"),
        files=[ExportFile(**f) for f in result["files"]] if "files" in result else None,
        archive=ExportFile(**result["archive"]) if "archive" in result else None,
        dataset_json=result.get("dataset_json"),
    )
