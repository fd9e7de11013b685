"""COCO JSON import (all-or-nothing, idempotent) and export of display-frame boxes, on :mod:`app.prompts.coco`."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.errors import Invalid
from app.datasets.models import Dataset
from app.prompts import coco
from app.prompts.coco import CocoBox
from app.prompts.repository import PromptFilter, PromptRepository
from app.prompts.schemas import CocoImportResult
from app.prompts.service import BoxRow, display_size, store_imported
from app.prompts.validation import Problems, check_box
from app.prompts.yolo import normalise_case
from app.prompts.yolo_service import ANNOTATOR_RE, CLIENT_ID_NAMESPACE
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository

EXPORT_PAGE = 10_000


def _check_annotator(name: str, loc: list[str | int], problems: Problems) -> str | None:
    if not ANNOTATOR_RE.match(name):
        problems.add(loc, f"annotator {name[:50]!r}: 1-200 printable characters without '/' or '\\'")
        return None
    return name


def import_coco(session: Session, dataset: Dataset, content: bytes, annotator: str | None,
                who: Principal) -> CocoImportResult:
    """Validate every image and annotation first; store all boxes and seen slices, or nothing (422)."""
    problems = Problems()
    default = None
    if annotator is not None and annotator.strip():
        default = _check_annotator(annotator.strip(), ["annotator"], problems)
    doc = coco.parse(content, set(dataset.labels), problems)
    if not problems.items and not doc.images:
        raise Invalid("the COCO file has no images")

    by_case: dict[str, list[Volume]] = defaultdict(list)
    for volume in VolumeRepository(session).list_for_dataset(dataset.id):
        by_case[normalise_case(volume.case_id)].append(volume)
    placed: dict[int, tuple[Volume, int]] = {}  # image index → (volume, k)
    origin: dict[tuple[int, int], int] = {}
    views: dict[int, set[tuple[int, str]]] = defaultdict(set)
    for image in doc.images:
        loc: list[str | int] = ["images", image.index]
        candidates = by_case.get(normalise_case(image.case), [])
        if len(candidates) != 1:
            why = "matches no volume" if not candidates else "matches several volumes"
            problems.add(loc, f"case {image.case!r} {why} of dataset {dataset.id}")
            continue
        volume = candidates[0]
        width, height = display_size(volume)
        if not 0 <= image.slice < volume.n_slices:
            problems.add(loc, f"slice {image.slice} out of range 0..{volume.n_slices - 1}")
            continue
        if (image.width, image.height) not in ((None, None), (width, height)):
            problems.add(loc, f"image is {image.width} x {image.height}; the display slice of case "
                              f"{volume.case_id!r} is {width} x {height} (boxes must be in display pixels)")
            continue
        if (volume.id, image.slice) in origin:
            problems.add(loc, f"same slice as images[{origin[volume.id, image.slice]}]")
            continue
        origin[volume.id, image.slice] = image.index
        placed[image.index] = (volume, image.slice)
        seen = image.seen_by if image.seen_by is not None else (() if default is None else (default,))
        for j, name in enumerate(seen):
            if _check_annotator(name, [*loc, "crowdsam", "seen_by", j], problems) is not None:
                views[volume.id].add((image.slice, name))

    boxes: dict[int, list[BoxRow]] = defaultdict(list)
    volumes: dict[int, Volume] = {v.id: v for v, _ in placed.values()}
    occurrences: Counter[tuple[Any, ...]] = Counter()
    keys: dict[tuple[str, uuid.UUID], int] = {}
    per_label: Counter[str] = Counter()
    for b in doc.boxes:
        loc = ["annotations", b.index]
        if b.image.index not in placed:
            continue  # its image's problem is reported already
        volume, k = placed[b.image.index]
        who_drew = b.annotator or default
        if who_drew is None:
            problems.add(loc, "no annotator: send the form field 'annotator' or \"crowdsam\": {\"annotator\"}")
            continue
        if _check_annotator(who_drew, [*loc, "crowdsam", "annotator"], problems) is None:
            continue
        width, height = display_size(volume)
        if (reason := check_box(b.box, width, height)) is not None:
            problems.add([*loc, "bbox"], reason)
            continue
        client_id = _client_id(b, volume.id, who_drew, k, occurrences)
        if (who_drew, client_id) in keys:
            problems.add([*loc, "crowdsam", "client_id"], f"client_id repeats annotations[{keys[who_drew, client_id]}]")
            continue
        keys[who_drew, client_id] = b.index
        boxes[volume.id].append(BoxRow(who_drew, k, b.label, b.box, client_id))
        per_label[b.label] += 1
    problems.raise_if_any(limit=500)

    stored, duplicates = store_imported(session, volumes, boxes, views, "coco-import", who.token_id)
    return CocoImportResult(
        images=len(placed), boxes=sum(len(b) for b in boxes.values()), stored=stored, duplicates=duplicates,
        seen_slices=len({(v, k, a) for v, pairs in views.items() for k, a in pairs}
                        | {(v, b.k, b.annotator) for v, rows in boxes.items() for b in rows}),
        per_label=dict(sorted(per_label.items())),
        volumes={volumes[v].case_id: len(b) for v, b in boxes.items()} | {
            volumes[v].case_id: 0 for v in volumes if v not in boxes},
    )


def _client_id(b: CocoBox, volume_id: int, annotator: str, k: int, occurrences: Counter[tuple[Any, ...]]) -> uuid.UUID:
    """The box's key: its exported ``client_id`` back on its own volume (a re-import is a no-op), derived
    from it on another volume (the key is unique per annotator across volumes), else from its content."""
    if b.client_id is not None:
        if b.image.volume_id == volume_id:
            return b.client_id
        return uuid.uuid5(CLIENT_ID_NAMESPACE, f"coco:{volume_id}:{annotator}:{b.client_id}")
    key = (k, b.label, *(round(v, 4) for v in b.box))
    occurrences[(volume_id, annotator, key)] += 1
    n = occurrences[(volume_id, annotator, key)]
    return uuid.uuid5(CLIENT_ID_NAMESPACE, f"coco:{volume_id}:{annotator}:{key}:{n}")


def export_coco(session: Session, volume: Volume, dataset: Dataset, annotator: str | None) -> dict[str, Any]:
    """The volume's boxes (and seen slices) as one COCO document; points have no COCO box and are left out."""
    repo = PromptRepository(session)
    views: dict[int, set[str]] = defaultdict(set)
    for a, k in repo.views(volume.id, annotator):
        views[k].add(a)
    rows: list[tuple[int, str, str, tuple[float, float, float, float], uuid.UUID | None]] = []
    f = PromptFilter(annotator=annotator, kind="box")
    offset = 0
    while True:
        page, _ = repo.page(volume.id, f, EXPORT_PAGE, offset)
        offset += len(page)
        rows += [(p.slice_index, p.label, p.annotator, (p.x0, p.y0, float(p.x1), float(p.y1)), p.client_id)
                 for p in page if p.x1 is not None and p.y1 is not None]
        if len(page) < EXPORT_PAGE:
            break
    rows.sort(key=lambda r: r[0])
    labels = dict(dataset.labels)
    missing = sorted({r[1] for r in rows} - set(labels))
    if missing:
        raise Invalid(f"labels {missing} are no longer labels of the dataset")
    width, height = display_size(volume)
    return coco.build(volume.case_id, width, height, labels, views, rows, volume.id)
