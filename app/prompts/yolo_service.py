"""YOLO import (all-or-nothing, idempotent) and export, on top of :mod:`app.prompts.yolo`."""

from __future__ import annotations

import re
import uuid
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.errors import Invalid
from app.datasets.models import Dataset
from app.imaging.coords import Orientation
from app.prompts.repository import PromptRepository
from app.prompts.schemas import YoloImportResult
from app.prompts.service import BoxRow, display_size, store_imported
from app.prompts.validation import check_box
from app.prompts.yolo import (
    CONVENTIONS,
    SeedMap,
    YoloError,
    expand_uploads,
    file_name,
    format_line,
    normalise_case,
    parse_file,
    pixels_to_yolo,
    write_zip,
    yolo_to_pixels,
)
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository

CLIENT_ID_NAMESPACE = uuid.UUID("5d9f1c0e-7c1a-4f43-9a55-2f7c3f1e8b61")
ANNOTATOR_RE = re.compile(r"^[^\x00-\x1f/\\]{1,200}$")


def _raise(errors: list[YoloError]) -> None:
    detail: list[dict[str, Any]] = [
        {"loc": [e.file] + ([e.line] if e.line is not None else []), "file": e.file, "line": e.line,
         "msg": f"{e.where}: {e.msg}", "type": "value_error"}
        for e in errors[:500]
    ]
    if len(errors) > 500:
        detail.append({"loc": [], "msg": f"... and {len(errors) - 500} more problems", "type": "more"})
    raise Invalid(detail)


def check_annotator(annotator: str) -> str:
    annotator = annotator.strip()
    if not ANNOTATOR_RE.match(annotator):
        raise Invalid("annotator: 1-200 printable characters without '/' or '\\'")
    return annotator


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise Invalid(f"convention {convention!r}: must be one of {list(CONVENTIONS)}")
    return convention


def import_yolo(session: Session, dataset: Dataset, uploads: list[tuple[str, bytes]], annotator: str,
                convention: str, who: Principal) -> YoloImportResult:
    """Validate every file and line first; store all boxes and seen slices, or nothing (422)."""
    annotator, convention = check_annotator(annotator), check_convention(convention)
    classes = dataset.prompt_classes or {}
    if not classes:
        raise Invalid(f"dataset {dataset.id} has no prompt_classes (YOLO class index → label name)")
    files, errors = expand_uploads(uploads)
    if not files and not errors:
        raise Invalid("no prompt files uploaded")

    by_case: dict[str, list[Volume]] = defaultdict(list)
    for volume in VolumeRepository(session).list_for_dataset(dataset.id):
        by_case[normalise_case(volume.case_id)].append(volume)
    seed_maps: dict[int, SeedMap | str] = {}
    origin: dict[tuple[int, int], str] = {}
    boxes: dict[int, list[BoxRow]] = defaultdict(list)
    views: dict[int, set[tuple[int, str]]] = defaultdict(set)
    volumes: dict[int, Volume] = {}
    per_class: Counter[str] = Counter()
    empty = 0

    for name, content in files:
        parsed, problems = parse_file(name, content)
        errors += problems
        if parsed is None:
            continue
        candidates = by_case.get(normalise_case(parsed.case), [])
        if len(candidates) != 1:
            why = "matches no volume" if not candidates else "matches several volumes"
            errors.append(YoloError(name, None, f"case {parsed.case!r} {why} of dataset {dataset.id}"))
            continue
        volume = candidates[0]
        width, height = display_size(volume)
        if convention == "display":
            k = parsed.z
            if not 0 <= k < volume.n_slices:
                errors.append(YoloError(name, None, f"slice {k} out of range 0..{volume.n_slices - 1}"))
                continue
        else:
            smap = seed_maps.get(volume.id)
            if smap is None:
                try:
                    smap = SeedMap(Orientation.from_affine(volume.affine, volume.shape))
                except ValueError as exc:
                    smap = str(exc)
                seed_maps[volume.id] = smap
            if isinstance(smap, str):
                errors.append(YoloError(name, None, smap))
                continue
            if not 0 <= parsed.z < smap.nz:
                errors.append(YoloError(name, None, f"slice {parsed.z} out of range 0..{smap.nz - 1} "
                                                    "(original z)"))
                continue
            k = smap.to_display((0.0, 0.0, 0.0, 0.0), parsed.z)[0]
        if (volume.id, k) in origin:
            errors.append(YoloError(name, None, f"same slice as {origin[volume.id, k]}"))
            continue
        origin[volume.id, k] = name
        volumes[volume.id] = volume
        views[volume.id].add((k, annotator))
        empty += not parsed.boxes
        occurrences: Counter[tuple[Any, ...]] = Counter()
        for b in parsed.boxes:
            label = classes.get(str(b.cls))
            if label is None:
                errors.append(YoloError(name, b.line, f"class {b.cls} is not in the dataset's prompt_classes "
                                                      f"{sorted(classes, key=int)}"))
                continue
            if convention == "display":
                box = yolo_to_pixels(b, height, width)
            else:
                assert isinstance(smap, SeedMap)
                box = smap.to_display(yolo_to_pixels(b, smap.rows, smap.cols), parsed.z)[1]
            if (reason := check_box(box, width, height)) is not None:
                errors.append(YoloError(name, b.line, reason))
                continue
            key = (k, label, *(round(v, 4) for v in box))
            occurrences[key] += 1
            client_id = uuid.uuid5(CLIENT_ID_NAMESPACE, f"yolo:{volume.id}:{annotator}:{key}:{occurrences[key]}")
            boxes[volume.id].append(BoxRow(annotator, k, label, box, client_id))
            per_class[str(b.cls)] += 1
    if errors:
        _raise(errors)

    stored, duplicates = store_imported(session, volumes, boxes, views, "yolo-import", who.token_id)
    return YoloImportResult(
        files=len(origin), empty_files=empty, boxes=sum(len(b) for b in boxes.values()), stored=stored,
        duplicates=duplicates, seen_slices=len(origin),
        per_class=dict(sorted(per_class.items(), key=lambda i: int(i[0]))),
        volumes={volumes[v].case_id: len(b) for v, b in boxes.items()},
    )


def export_yolo(session: Session, volume: Volume, dataset: Dataset, convention: str,
                annotator: str | None) -> bytes:
    """A zip of ``img{case}-slice{ZZZ}.txt`` files (empty for seen-but-empty slices).

    One annotator (or a volume with one) gives flat files; several give one folder each.
    Points have no YOLO form and are left out.
    """
    convention = check_convention(convention)
    class_of: dict[str, int] = {}
    for index, label in sorted((dataset.prompt_classes or {}).items(), key=lambda i: -int(i[0])):
        class_of[label] = int(index)  # the smallest class index wins for a label named twice
    repo = PromptRepository(session)
    rows = repo.boxes(volume.id, annotator)
    missing = sorted({r.label for r in rows} - set(class_of))
    if missing:
        raise Invalid(f"labels {missing} have no YOLO class in the dataset's prompt_classes")
    width, height = display_size(volume)
    smap = None
    if convention == "seed":
        try:
            smap = SeedMap(Orientation.from_affine(volume.affine, volume.shape))
        except ValueError as exc:
            raise Invalid(str(exc)) from exc

    lines: dict[tuple[str, int], list[str]] = defaultdict(list)
    for a, k in repo.views(volume.id, annotator):
        lines.setdefault((a, k), [])  # a seen slice gets a file even when empty
    for r in rows:
        box = (r.x0, r.y0, r.x1, r.y1)
        if smap is None:
            values = pixels_to_yolo(box, height, width)
        else:
            values = pixels_to_yolo(smap.from_display(box), smap.rows, smap.cols)
        lines[(r.annotator, r.slice_index)].append(format_line(class_of[r.label], values))
    annotators = {a for a, _ in lines}
    nested = len(annotators) > 1
    files: dict[str, list[str]] = {}
    for (a, k), content in lines.items():
        z = k if smap is None else smap.z_of(k)
        name = file_name(volume.case_id, z)
        files[f"{_folder(a)}/{name}" if nested else name] = content
    return write_zip(files)


def _folder(annotator: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.@+-]", "_", annotator)
    return "_" if safe in (".", "..") else safe
