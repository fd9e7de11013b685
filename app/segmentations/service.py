"""Segmentation requests: validate, create rows, enqueue jobs, cancel, and shape rows for the API.

The API never imports torch: the model registry is torch-free and jobs are enqueued by dotted
path. Rows are committed by the request before their job is enqueued (a worker must find them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.errors import Conflict, Invalid
from app.core.jobs import JobStatus
from app.core.redis import enqueue_job, get_redis
from app.core.security import Principal
from app.datasets.models import Dataset
from app.segmentations import registry
from app.segmentations.models import Segmentation
from app.segmentations.repository import SegmentationRepository
from app.segmentations.schemas import ModelOut, SegmentationCreate, SegmentationOut
from app.volumes.models import Volume

JOB_FUNC = "workers.jobs.segment.run_segmentation"
QUEUE = "sam"
RETRY_INTERVALS = [5, 30, 120]
TERMINAL = (JobStatus.finished, JobStatus.failed, JobStatus.canceled)


def list_models() -> list[ModelOut]:
    return [ModelOut(**vars(info)) for info in registry.list_models(get_settings().checkpoint_dir)]


def check_model(name: str) -> None:
    """Unknown model → 422; known but not runnable here (no/bad checkpoint) → 409 with the reason."""
    try:
        info = registry.model_info(name, get_settings().checkpoint_dir)
    except KeyError as exc:
        known = ", ".join(registry.MODEL_NAMES)
        raise Invalid(f"unknown model {name!r} (known: {known})") from exc
    if not info.available:
        raise Conflict(f"model {name!r} is not available: {info.reason}")


def job_id(segmentation_id: int) -> str:
    return f"segmentation-{segmentation_id}"


def cancel_key(segmentation_id: int) -> str:
    return f"crowdsam:segmentation:{segmentation_id}:cancel"


def cancel_requested(segmentation_id: int) -> bool:
    return bool(get_redis().exists(cancel_key(segmentation_id)))


@dataclass
class _Plan:
    labels: list[str]
    n_slices: int


def _plan(repo: SegmentationRepository, volume: Volume, dataset: Dataset, labels: Sequence[str] | None) -> _Plan:
    if labels is not None:
        _check_labels(dataset, labels)
    used, n_slices = repo.prompt_summary(volume.id, labels)
    if not used:
        which = f" for labels {list(labels)}" if labels is not None else ""
        raise Invalid(f"volume {volume.id} has no prompts{which}: post boxes or points first")
    chosen = list(labels) if labels is not None else [name for name in used if name in dataset.labels]
    return _Plan(chosen, n_slices)


def create(
    session: Session, volume: Volume, dataset: Dataset, body: SegmentationCreate, principal: Principal
) -> Segmentation:
    """Validate and add a queued row (flushed, not committed; enqueue after the commit)."""
    check_model(body.model)
    repo = SegmentationRepository(session)
    plan = _plan(repo, volume, dataset, body.labels)
    row = repo.add(
        Segmentation(
            volume_id=volume.id,
            model=body.model,
            fusion=body.fusion,
            labels=plan.labels,
            status=JobStatus.queued,
            progress={"done": 0, "total": plan.n_slices},
            stats={},
            attempts=0,
            created_by=principal.name,
        )
    )
    row.rq_job_id = job_id(row.id)
    session.flush()
    return row


def create_for_dataset(
    session: Session, dataset: Dataset, volumes: Sequence[Volume], body: SegmentationCreate, principal: Principal
) -> tuple[list[Segmentation], list[int]]:
    """One row per volume with prompts (for the requested labels); volumes without prompts are skipped."""
    check_model(body.model)
    repo = SegmentationRepository(session)
    if body.labels is not None:
        _check_labels(dataset, body.labels)
    with_prompts = repo.volumes_with_prompts(dataset.id, body.labels)
    rows = [create(session, v, dataset, body, principal) for v in volumes if v.id in with_prompts]
    skipped = [v.id for v in volumes if v.id not in with_prompts]
    if not rows:
        raise Invalid(f"no volume of dataset {dataset.id} has prompts for these labels: post boxes first")
    return rows, skipped


def _check_labels(dataset: Dataset, labels: Sequence[str]) -> None:
    unknown = [name for name in labels if name not in dataset.labels]
    if unknown:
        raise Invalid(f"labels {unknown} are not labels of dataset {dataset.id} (has: {sorted(dataset.labels)})")


def enqueue(rows: Sequence[Segmentation]) -> None:
    """Put committed rows on the ``sam`` queue (by dotted path: the API never imports torch)."""
    for row in rows:
        enqueue_job(QUEUE, JOB_FUNC, row.id, job_id=job_id(row.id), retry_intervals=RETRY_INTERVALS,
                    description=f"segmentation {row.id} of volume {row.volume_id} ({row.model})")


def cancel(session: Session, segmentation_id: int) -> Segmentation:
    """Queued → canceled now; running → the job stops at its next progress tick."""
    row = SegmentationRepository(session).get(segmentation_id, for_update=True)
    if row.status in TERMINAL:
        raise Conflict(f"segmentation {row.id} is already {row.status}")
    get_redis().set(cancel_key(row.id), 1, ex=7 * 24 * 3600)
    if row.status == JobStatus.queued:
        row.status = JobStatus.canceled
        row.error = "canceled before it started"
        _cancel_rq_job(row.id)
    session.flush()
    return row


def _cancel_rq_job(segmentation_id: int) -> None:
    # Already gone or running: the job checks the row and the flag when it starts.
    with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
        Job.fetch(job_id(segmentation_id), connection=get_redis()).cancel()


def to_out(row: Segmentation) -> SegmentationOut:
    progress = row.progress or {}
    return SegmentationOut(
        id=row.id,
        volume_id=row.volume_id,
        model=row.model,
        fusion=row.fusion,  # type: ignore[arg-type]
        labels=row.labels,
        status=row.status,  # type: ignore[arg-type]
        progress={"done": int(progress.get("done", 0)), "total": int(progress.get("total", 0))},  # type: ignore[arg-type]
        error=row.error,
        cancel_requested=row.status not in TERMINAL and cancel_requested(row.id),
        attempts=row.attempts,
        stats=row.stats or {},
        mask_url=f"/api/v1/segmentations/{row.id}/mask" if row.mask_key else None,
        mask_sha256=row.mask_sha256,
        created_by=row.created_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
