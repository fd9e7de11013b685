"""COCO JSON boxes: parsing (every problem collected with where it is) and building; no database.

One COCO file describes slices as images and boxes as annotations:

- an image is a display slice, named ``img{CASE}-slice{ZZZ}.png`` (the YOLO import's naming, any image
  extension) or identified by the extension field ``"crowdsam": {"case_id": "...", "slice": k}`` (it wins);
  ``width``/``height``, when given, must equal the volume's ``display_size`` (the frame check);
- a category is matched to a dataset label by ``name``;
- ``bbox`` is ``[x, y, w, h]`` in display pixels (origin top-left, the annotate page's frame);
- ``"crowdsam": {"annotator": "..."}`` on an annotation, or ``"seen_by": [...]`` on an image, name
  annotators; otherwise the import's ``annotator`` applies. An image without annotations is a slice
  seen with nothing drawn, as an empty YOLO file. ``"client_id"`` on an annotation (with ``"volume_id"``
  on its image) keeps an exported box's identity, so re-importing an export is idempotent.

:mod:`app.prompts.coco_service` matches images to volumes and stores the boxes.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.prompts.validation import Problems

MAX_BYTES = 64 << 20
MAX_IMAGES = 50_000
MAX_ANNOTATIONS = 500_000
MAX_CATEGORIES = 1_000
FILE_NAME_RE = re.compile(
    r"^img(?P<case>[A-Za-z0-9][A-Za-z0-9_.-]*?)-slice(?P<z>\d{1,6})\.(?:png|jpe?g|tiff?|bmp)$", re.IGNORECASE
)


@dataclass(frozen=True)
class CocoImage:
    index: int  # position in ``images`` (for messages)
    case: str
    slice: int
    width: int | None
    height: int | None
    seen_by: tuple[str, ...] | None
    volume_id: int | None = None  # the volume it was exported from (crowdsam.volume_id)


@dataclass(frozen=True)
class CocoBox:
    index: int  # position in ``annotations``
    image: CocoImage
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 display pixels
    annotator: str | None
    client_id: uuid.UUID | None = None  # crowdsam.client_id: the box's idempotency key where it came from


@dataclass
class CocoDocument:
    images: list[CocoImage] = field(default_factory=list)
    boxes: list[CocoBox] = field(default_factory=list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _key(v: Any) -> int | str | None:
    """COCO ids are integers (strings accepted); anything else is not an id."""
    return v if (_is_int(v) or (isinstance(v, str) and 0 < len(v) <= 200)) else None


def _annotator(value: Any, loc: list[str | int], problems: Problems) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    problems.add(loc, "annotator must be a non-empty string")
    return None


def _list(doc: dict[str, Any], name: str, limit: int, problems: Problems, required: bool = True) -> list[Any]:
    value = doc.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        problems.add([name], f"'{name}' must be a list")
        return []
    if len(value) > limit:
        problems.add([name], f"{len(value)} {name}; the limit is {limit}")
        return []
    return value


def parse(content: bytes, labels: set[str], problems: Problems) -> CocoDocument:
    """Parse and check a COCO document: shapes, ids, categories (by label name) and bbox geometry.

    Volume matching and bounds against a volume's display size are the service's part.
    """
    doc = CocoDocument()
    if len(content) > MAX_BYTES:
        problems.add([], f"{len(content)} bytes; a COCO file may have at most {MAX_BYTES}")
        return doc
    try:
        data = json.loads(content.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems.add([], f"not a JSON document ({exc})")
        return doc
    if not isinstance(data, dict):
        problems.add([], "a COCO document is a JSON object with 'images', 'categories' and 'annotations'")
        return doc

    categories: dict[int | str, str] = {}
    for i, c in enumerate(_list(data, "categories", MAX_CATEGORIES, problems)):
        loc: list[str | int] = ["categories", i]
        if not isinstance(c, dict) or (cid := _key(c.get("id"))) is None or not isinstance(c.get("name"), str):
            problems.add(loc, "a category needs an integer 'id' and a string 'name'")
            continue
        if cid in categories:
            problems.add(loc, f"category id {cid!r} repeats")
        elif c["name"] not in labels:
            problems.add(loc, f"category {c['name']!r} is not a label of the dataset {sorted(labels)}")
        else:
            categories[cid] = c["name"]

    images: dict[int | str, CocoImage] = {}
    for i, im in enumerate(_list(data, "images", MAX_IMAGES, problems)):
        loc = ["images", i]
        if not isinstance(im, dict) or (iid := _key(im.get("id"))) is None:
            problems.add(loc, "an image needs an integer 'id'")
            continue
        if iid in images:
            problems.add(loc, f"image id {iid!r} repeats")
            continue
        ext = im.get("crowdsam")
        ext = ext if isinstance(ext, dict) else {}
        case, z = ext.get("case_id"), ext.get("slice")
        if case is None or z is None:
            match = FILE_NAME_RE.match(str(im.get("file_name", "")).rsplit("/", 1)[-1])
            if match is None:
                problems.add(loc, "file_name must look like img{CASE}-slice{ZZZ}.png (or give "
                                  "\"crowdsam\": {\"case_id\", \"slice\"})")
                continue
            case, z = match["case"], int(match["z"])
        if not isinstance(case, str) or not case or not _is_int(z) or z < 0:
            problems.add(loc, "crowdsam.case_id must be a string and crowdsam.slice a non-negative integer")
            continue
        size = [im.get("width"), im.get("height")]
        if any(v is not None and not (_is_int(v) and v > 0) for v in size):
            problems.add(loc, "width and height must be positive integers")
            continue
        seen_by: tuple[str, ...] | None = None
        if "seen_by" in ext:
            if not isinstance(ext["seen_by"], list) or len(ext["seen_by"]) > 1000:
                problems.add([*loc, "crowdsam", "seen_by"], "seen_by must be a list of annotator names")
                continue
            names = [_annotator(a, [*loc, "crowdsam", "seen_by", j], problems) for j, a in enumerate(ext["seen_by"])]
            seen_by = tuple(n for n in names if n is not None)
        source = ext.get("volume_id")
        images[iid] = CocoImage(i, case, z, size[0], size[1], seen_by, source if _is_int(source) else None)
    doc.images = list(images.values())

    for i, a in enumerate(_list(data, "annotations", MAX_ANNOTATIONS, problems)):
        loc = ["annotations", i]
        if not isinstance(a, dict):
            problems.add(loc, "an annotation is an object with image_id, category_id and bbox")
            continue
        iid, cid = _key(a.get("image_id")), _key(a.get("category_id"))
        image = None if iid is None else images.get(iid)
        if image is None:
            problems.add([*loc, "image_id"], f"image_id {a.get('image_id')!r} is not an image of the file")
        label = None if cid is None else categories.get(cid)
        if label is None:
            problems.add([*loc, "category_id"], f"category_id {a.get('category_id')!r} is not a (valid) category")
        bbox = a.get("bbox")
        box: tuple[float, float, float, float] | None = None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            problems.add([*loc, "bbox"], "bbox must be 4 finite numbers [x, y, width, height]")
        elif bbox[2] <= 0 or bbox[3] <= 0:
            problems.add([*loc, "bbox"], f"bbox {bbox}: width and height must be positive")
        else:
            box = (float(bbox[0]), float(bbox[1]), float(bbox[0] + bbox[2]), float(bbox[1] + bbox[3]))
        ext = a.get("crowdsam")
        annotator, client_id = None, None
        if isinstance(ext, dict) and "annotator" in ext:
            annotator = _annotator(ext["annotator"], [*loc, "crowdsam", "annotator"], problems)
        if isinstance(ext, dict) and ext.get("client_id") is not None:
            try:
                client_id = uuid.UUID(str(ext["client_id"]))
            except ValueError:
                problems.add([*loc, "crowdsam", "client_id"], f"client_id {str(ext['client_id'])[:50]!r} is not a UUID")
        if image is not None and label is not None and box is not None:
            doc.boxes.append(CocoBox(i, image, label, box, annotator, client_id))
    return doc


def file_name(case: str, k: int) -> str:
    return f"img{case}-slice{k:03d}.png"


def build(case: str, width: int, height: int, labels: dict[str, int],
          views: dict[int, set[str]],
          boxes: list[tuple[int, str, str, tuple[float, float, float, float], uuid.UUID | None]],
          volume_id: int) -> dict[str, Any]:
    """A COCO document of one volume: ``views`` slice → annotators who saw it; ``boxes`` (slice, label,
    annotator, display box, client id). Category ids are the dataset's label values."""
    slices = sorted(set(views) | {k for k, *_ in boxes})
    image_id = {k: n for n, k in enumerate(slices, start=1)}
    images = [
        {"id": image_id[k], "file_name": file_name(case, k), "width": width, "height": height,
         "crowdsam": {"volume_id": volume_id, "case_id": case, "slice": k, "seen_by": sorted(views.get(k, ()))}}
        for k in slices
    ]
    annotations = [
        {"id": n, "image_id": image_id[k], "category_id": labels[label],
         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
         "crowdsam": {"annotator": annotator, "client_id": None if client_id is None else str(client_id)}}
        for n, (k, label, annotator, (x0, y0, x1, y1), client_id) in enumerate(boxes, start=1)
    ]
    categories = [{"id": value, "name": name, "supercategory": "organ"}
                  for name, value in sorted(labels.items(), key=lambda i: i[1])]
    return {
        "info": {"description": f"crowdsam prompts of case {case}", "version": "1.0"},
        "images": images, "categories": categories, "annotations": annotations,
    }
