"""Segmentation requests: validate, create rows, enqueue jobs, cancel, and shape rows for the API.

The API never imports torch: the model registry is torch-free and jobs are enqueued by dotted
path (:mod:`app.segmentations.jobs`) once the request's transaction has committed (:mod:`app.jobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.config import get_settings
from app.core.errors import Conflict, Invalid
from app.datasets.models import Dataset
from app.jobs import submit
from app.jobs.states import JobStatus
from app.jobs.submit import stopping
from app.segmentations import registry
from app.segmentations.jobs import KIND
from app.segmentations.models import Segmentation
from app.segmentations.repository import SegmentationRepository
from app.segmentations.schemas import ModelOut, SegmentationCreate, SegmentationOut
from app.volumes.models import Volume


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
    """Validate and add a queued row (flushed; the caller submits it, it is enqueued after the commit)."""
    check_model(body.model)
    repo = SegmentationRepository(session)
    plan = _plan(repo, volume, dataset, body.labels)
    row = repo.add(
        Segmentation(
            volume_id=volume.id,
            model=body.model,
            fusion=body.fusion,
            labels=plan.labels,
            fill_gaps=body.fill_gaps,
            status=JobStatus.queued,
            progress={"done": 0, "total": plan.n_slices},
            stats={},
            attempts=0,
            created_by=principal.name,
        )
    )
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


def delete(session: Session, segmentation_id: int) -> None:
    """Delete a segmentation and (after the commit) its mask files; see :func:`app.jobs.submit.delete`.

    Refused (409) while a queued or running export or evaluation reads its mask; finished ones keep
    their files and results (their ``params`` keep the id of the segmentation they used).
    """
    from app.evaluations.models import Evaluation
    from app.exports.models import Export

    row = SegmentationRepository(session).get(segmentation_id, for_update=True)
    uses = {"cases": [{"segmentation_id": row.id}]}
    for model, name in ((Export, "export"), (Evaluation, "evaluation")):
        user = session.scalar(select(model.id).where(model.status.in_(submit.ACTIVE), model.params.contains(uses))
                              .order_by(model.id).limit(1))
        if user is not None:
            raise Conflict(f"segmentation {row.id} is used by {name} {user}, which has not finished: "
                           "wait for it or cancel it first")

    def files(seg: Segmentation) -> list[str]:
        keys = [f"volumes/{seg.volume_id}/segmentations/{seg.id}"]
        if seg.mask_key is not None and not seg.mask_key.startswith(keys[0] + "/"):
            keys.append(seg.mask_key)
        return keys

    submit.delete(session, KIND, row.id, files)


def to_out(row: Segmentation) -> SegmentationOut:
    progress = row.progress or {}
    return SegmentationOut(
        id=row.id,
        volume_id=row.volume_id,
        model=row.model,
        fusion=row.fusion,  # type: ignore[arg-type]
        labels=row.labels,
        fill_gaps=row.fill_gaps,
        status=row.status,  # type: ignore[arg-type]
        progress={"done": int(progress.get("done", 0)), "total": int(progress.get("total", 0))},  # type: ignore[arg-type]
        error=row.error,
        cancel_requested=stopping(KIND, row),
        attempts=row.attempts,
        stats=row.stats or {},
        mask_url=f"/api/v1/segmentations/{row.id}/mask" if row.mask_key else None,
        mask_sha256=row.mask_sha256,
        created_by=row.created_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
