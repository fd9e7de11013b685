"""Prompt logic: validate a whole batch (all-or-nothing), store it idempotently, record seen slices."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.errors import Forbidden, Invalid
from app.datasets.models import Dataset
from app.imaging.coords import display_shape
from app.prompts.models import Prompt
from app.prompts.repository import InsertOutcome, PromptFilter, PromptRepository
from app.prompts.schemas import (
    MAX_ITEMS_PER_REQUEST,
    CoverageLabel,
    CoverageOut,
    CoverageSlice,
    PostResult,
    PromptBatch,
    PromptOut,
    PromptPage,
)
from app.prompts.validation import Problems, check_box, check_point, check_slice
from app.segmentations import preencode
from app.tasks import agreement, leases
from app.volumes.models import Volume

SOURCES = ("api", "yolo-import", "simulated")


@dataclass(frozen=True)
class BoxRow:
    """A validated box ready to store (display pixels of slice ``k``)."""

    annotator: str
    k: int
    label: str
    box: tuple[float, float, float, float]
    client_id: uuid.UUID


def display_size(volume: Volume) -> tuple[int, int]:
    """(width, height) of the volume's display slices."""
    rows, cols = display_shape(volume.canonical_shape)
    return cols, rows


def _row(volume_id: int, annotator: str, token_id: int | None, source: str, **fields: Any) -> dict[str, Any]:
    base = {
        "volume_id": volume_id, "annotator": annotator, "token_id": token_id, "source": source,
        "x1": None, "y1": None, "positive": None,
    }
    base.update(fields)
    if base.get("client_id") is None:
        base["client_id"] = uuid.uuid4()  # every row gets a key: results map back by (annotator, client_id)
    return base


def post_prompts(session: Session, volume: Volume, dataset: Dataset, who: Principal, batch: PromptBatch) -> PostResult:
    """Validate every item, then store all of them (or none) and mark their slices seen."""
    n_items = len(batch.boxes) + len(batch.points)
    if n_items + len(batch.seen) == 0:
        raise Invalid("nothing to store: send boxes, points or seen slices")
    if n_items > MAX_ITEMS_PER_REQUEST or len(batch.seen) > MAX_ITEMS_PER_REQUEST:
        raise Invalid(f"at most {MAX_ITEMS_PER_REQUEST} prompts and seen slices per request")
    width, height = display_size(volume)
    problems = Problems()
    client_ids: dict[uuid.UUID, str] = {}

    def common(where: str, index: int, k: int, label: str, client_id: uuid.UUID | None) -> None:
        if (reason := check_slice(k, volume.n_slices)) is not None:
            problems.add([where, index, "slice"], reason, index=index)
        if label not in dataset.labels:
            problems.add([where, index, "label"], f"label {label!r} is not one of {sorted(dataset.labels)}",
                         index=index)
        if client_id is not None:
            if client_id in client_ids:
                problems.add([where, index, "client_id"],
                             f"client_id {client_id} repeats {client_ids[client_id]} in this request", index=index)
            client_ids[client_id] = f"{where}[{index}]"

    rows: list[dict[str, Any]] = []
    for i, b in enumerate(batch.boxes):
        common("boxes", i, b.slice, b.label, b.client_id)
        if (reason := check_box(b.box, width, height)) is not None:
            problems.add(["boxes", i, "box"], reason, index=i)
        elif not problems.items:
            x0, y0, x1, y1 = b.box
            rows.append(_row(volume.id, who.name, who.token_id, "api", slice_index=b.slice, label=b.label,
                             kind="box", x0=x0, y0=y0, x1=x1, y1=y1, client_id=b.client_id))
    for i, p in enumerate(batch.points):
        common("points", i, p.slice, p.label, p.client_id)
        if (reason := check_point(p.point, width, height)) is not None:
            problems.add(["points", i, "point"], reason, index=i)
        elif not problems.items:
            rows.append(_row(volume.id, who.name, who.token_id, "api", slice_index=p.slice, label=p.label,
                             kind="point", x0=p.point[0], y0=p.point[1], positive=p.positive,
                             client_id=p.client_id))
    for i, k in enumerate(batch.seen):
        if (reason := check_slice(k, volume.n_slices)) is not None:
            problems.add(["seen", i], reason, index=i)
    problems.raise_if_any()
    seen = sorted({r["slice_index"] for r in rows} | set(batch.seen))
    if who.is_annotator and dataset.tasks_only:
        _check_tasks(session, volume, who, seen)

    outcome = PromptRepository(session).insert_many(rows)
    record_views(session, volume, ((k, who.name) for k in seen), "api")
    return PostResult(ids=outcome.ids, duplicates=outcome.duplicates, seen=seen)


def _check_tasks(session: Session, volume: Volume, who: Principal, slices: list[int]) -> None:
    """A ``tasks_only`` dataset: every slice must be leased to the annotator or already worked on by them
    (a retry after the lease was released by the first, acknowledged attempt)."""
    missing = unassigned_slices(session, volume, who.name, slices)
    if missing:
        raise Forbidden(f"slices {sorted(missing)[:20]} of volume {volume.id} are not among your tasks: this "
                        "dataset accepts prompts only on slices handed out by GET /tasks/next")


def unassigned_slices(session: Session, volume: Volume, annotator: str, slices: Iterable[int]) -> set[int]:
    """The slices of ``slices`` the annotator neither holds a lease on (``GET /tasks/next``) nor has worked on."""
    missing = set(slices) - leases.held(volume.id, slices, annotator)
    if missing:
        missing -= PromptRepository(session).seen_by(volume.id, annotator, missing)
    return missing


def store_boxes(session: Session, volume: Volume, boxes: list[BoxRow], seen: Iterable[tuple[int, str]],
                source: str, token_id: int | None) -> InsertOutcome:
    """Store validated boxes from an import or a simulation, plus the (slice, annotator) views."""
    rows = [
        _row(volume.id, b.annotator, token_id, source, slice_index=b.k, label=b.label, kind="box",
             x0=b.box[0], y0=b.box[1], x1=b.box[2], y1=b.box[3], client_id=b.client_id)
        for b in boxes
    ]
    outcome = PromptRepository(session).insert_many(rows)
    views = set(seen) | {(b.k, b.annotator) for b in boxes}
    record_views(session, volume, views, source)
    return outcome


def store_imported(session: Session, volumes: Mapping[int, Volume], boxes: Mapping[int, list[BoxRow]],
                   views: Mapping[int, Iterable[tuple[int, str]]], source: str, token_id: int | None
                   ) -> tuple[int, int]:
    """Store an import's validated boxes and views volume by volume; returns (stored, duplicates)."""
    stored = duplicates = 0
    for volume_id, volume in volumes.items():
        outcome = store_boxes(session, volume, boxes[volume_id], views[volume_id], source, token_id)
        duplicates += len(outcome.duplicates)
        stored += len(outcome.ids) - len(outcome.duplicates)
    return stored, duplicates


def record_views(session: Session, volume: Volume, views: Iterable[tuple[int, str]], source: str) -> None:
    """Mark (slice, annotator) views, free the annotators' leases there and queue the slices' crowd agreement
    for recomputing (task assignment gives disputed slices extra views)."""
    views = set(views)
    PromptRepository(session).mark_seen(volume.id, views, source)
    preencode.request_decode_after_commit(session, volume.id)  # decode the new prompts while the crowd draws
    agreement.touched(session, volume.dataset_id, volume.id, (k for k, _ in views))
    by_annotator: dict[str, list[int]] = {}
    for k, annotator in views:
        by_annotator.setdefault(annotator, []).append(k)
    for annotator, slices in by_annotator.items():
        leases.release(volume.dataset_id, volume.id, slices, annotator)


def prompt_out(p: Prompt) -> PromptOut:
    is_box = p.kind == "box"
    return PromptOut(
        id=p.id, volume_id=p.volume_id, slice=p.slice_index, label=p.label, annotator=p.annotator,
        kind="box" if is_box else "point",
        box=[p.x0, p.y0, p.x1, p.y1] if is_box else None,  # type: ignore[list-item]
        point=None if is_box else [p.x0, p.y0],
        positive=None if is_box else p.positive,
        source=p.source, client_id=p.client_id, created_at=p.created_at,
    )


def list_prompts(session: Session, volume: Volume, who: Principal, f: PromptFilter, limit: int,
                 offset: int) -> PromptPage:
    """A page of a volume's prompts; annotators only ever see their own."""
    if who.is_annotator:
        if f.annotator is not None and f.annotator != who.name:
            raise Forbidden("annotators may only list their own prompts")
        f = PromptFilter(slice=f.slice, label=f.label, annotator=who.name, kind=f.kind)
    items, total = PromptRepository(session).page(volume.id, f, limit, offset)
    return PromptPage(items=[prompt_out(p) for p in items], total=total, limit=limit, offset=offset)


def delete_prompt(session: Session, prompt_id: int, who: Principal) -> None:
    repo = PromptRepository(session)
    prompt = repo.get(prompt_id)
    if who.is_annotator and prompt.annotator != who.name:
        raise Forbidden(f"prompt {prompt_id} belongs to another annotator")
    volume = session.get(Volume, prompt.volume_id)
    if volume is not None:
        agreement.touched(session, volume.dataset_id, volume.id, [prompt.slice_index])
    repo.delete(prompt)


def coverage(session: Session, volume: Volume) -> CoverageOut:
    """Per slice: annotators and prompts per label, and how many annotators saw it."""
    repo = PromptRepository(session)
    slices: dict[int, CoverageSlice] = {}
    for k, seen_by in repo.view_counts(volume.id):
        slices[k] = CoverageSlice(slice=k, labels={}, seen_by=int(seen_by))
    for k, label, annotators, prompts in repo.prompt_counts(volume.id):
        entry = slices.setdefault(k, CoverageSlice(slice=k, labels={}, seen_by=0))
        entry.labels[label] = CoverageLabel(annotators=int(annotators), prompts=int(prompts))
    return CoverageOut(volume_id=volume.id, n_slices=volume.n_slices, slices=[slices[k] for k in sorted(slices)])
