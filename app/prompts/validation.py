"""Checks on prompt geometry: every problem is collected with its item so one 422 lists them all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import Invalid


@dataclass
class Problems:
    """Collects ``{"loc": [...], "msg": ...}`` entries; :meth:`raise_if_any` makes the 422."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, loc: Sequence[str | int], msg: str, **extra: Any) -> None:
        self.items.append({"loc": list(loc), "msg": msg, "type": "value_error", **extra})

    def raise_if_any(self, limit: int = 200) -> None:
        if self.items:
            shown = self.items[:limit]
            if len(self.items) > limit:
                shown.append({"loc": [], "msg": f"... and {len(self.items) - limit} more problems", "type": "more"})
            raise Invalid(shown)


def check_slice(k: int, n_slices: int) -> str | None:
    if not 0 <= k < n_slices:
        return f"slice {k} out of range 0..{n_slices - 1}"
    return None


def check_box(box: Sequence[float], width: int, height: int) -> str | None:
    """Reason a display box is unacceptable, or None. The image spans [0, width] x [0, height]."""
    if len(box) != 4:
        return f"box must have 4 numbers [x0, y0, x1, y1], got {len(box)}"
    if not all(math.isfinite(v) for v in box):
        return "box has NaN or infinite coordinates"
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        return f"box {list(box)} has zero or negative area (needs x0 < x1 and y0 < y1)"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return f"box {list(box)} lies outside the image [0, {width}] x [0, {height}]"
    return None


def check_point(point: Sequence[float], width: int, height: int) -> str | None:
    if len(point) != 2:
        return f"point must have 2 numbers [x, y], got {len(point)}"
    if not all(math.isfinite(v) for v in point):
        return "point has NaN or infinite coordinates"
    x, y = point
    if not (0 <= x <= width and 0 <= y <= height):
        return f"point {list(point)} lies outside the image [0, {width}] x [0, {height}]"
    return None
