"""Export requests: every check runs before a row exists; the job does the writing.

A request is refused (422) when nnU-Net would refuse the result or when labels are missing:
reserved dataset numbers, bad folder names, a train case without a reference (label_source
reference) or without a finished segmentation of the model (label_source segmentation).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from app.core.errors import Conflict, Invalid
from app.core.jobs import JobStatus
from app.core.redis import enqueue_job
from app.core.security import Principal
from app.datasets.models import Dataset
from app.exports.models import Export
from app.exports.repository import ExportRepository, latest_finished_segmentation
from app.exports.schemas import DATASET_NAME_PATTERN, ExportCreate, ExportFile, ExportOut
from app.segmentations import registry
from app.volumes.repository import VolumeRepository

JOB_FUNC = "workers.jobs.export.run_export"
QUEUE = "cpu"
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
    """Validate and add a queued export row (flushed; the router commits, then enqueues)."""
    name = folder_name_for(dataset, body.dataset_name)
    volumes = VolumeRepository(session).list_for_dataset(dataset.id)
    train = [v for v in volumes if v.split == "train"]
    test = [v for v in volumes if v.split == "test"] if body.include_test else []
    if not train:
        raise Invalid(f"dataset {dataset.id} has no train cases: nnU-Net needs at least one labelled case")
    model: str | None = None
    cases: list[dict[str, Any]] = []
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
        cases = [{"volume_id": v.id, "case_id": v.case_id, "split": "train"} for v in train]
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
            cases.append({"volume_id": v.id, "case_id": v.case_id, "split": "train", "segmentation_id": seg.id})
        if missing:
            raise Invalid(f"no finished {model!r} segmentation for train cases {missing}: segment them first")
        if partial:
            raise Invalid(f"segmentations must cover every label of the dataset: {'; '.join(partial)}")
    cases += [{"volume_id": v.id, "case_id": v.case_id, "split": "test"} for v in test]
    params = {
        **body.model_dump(),
        "dataset_name": name,
        "model": model,
        "folder": f"Dataset{body.dataset_number:03d}_{name}",
        "cases": cases,
    }
    row = ExportRepository(session).add(
        Export(
            dataset_id=dataset.id,
            format=body.format,
            params=params,
            status=JobStatus.queued,
            progress={"done": 0, "total": len(cases)},
            attempts=0,
            created_by=principal.name,
        )
    )
    row.rq_job_id = job_id(row.id)
    session.flush()
    return row


def job_id(export_id: int) -> str:
    return f"export-{export_id}"


def enqueue(row: Export) -> None:
    """Put a committed export on the ``cpu`` queue by dotted path."""
    enqueue_job(QUEUE, JOB_FUNC, row.id, job_id=job_id(row.id), retry_intervals=(5, 30),
                description=f"nnU-Net export {row.id} of dataset {row.dataset_id}")


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
        created_by=row.created_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        folder=result.get("folder"),
        files=[ExportFile(**f) for f in result["files"]] if "files" in result else None,
        archive=ExportFile(**result["archive"]) if "archive" in result else None,
        dataset_json=result.get("dataset_json"),
    )
