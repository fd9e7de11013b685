"""OpenLabeling/YOLO prompt files: safe archive reading, parsing, coordinate conventions, writing.

A file ``img{CASE}-slice{ZZZ}.txt`` holds one line per box, ``class xc yc w h``, normalised to
the PNG the annotator saw; an empty file means "slice seen, nothing drawn". Conventions:

- ``display``: the PNG is our display slice ``k = ZZZ`` (W × H = canonical X × Y).
- ``seed``: the study's PNG of ``original[:, :, ZZZ]`` (``original[:, :, z] =
  fliplr(flipud(rot90(png)))``), mapped by ``app.imaging.coords.seed_box_to_display``.

Nothing here touches the database; :mod:`app.prompts.yolo_service` does.
"""

from __future__ import annotations

import io
import math
import posixpath
import re
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.imaging.coords import Box, Orientation, seed_box_to_display, seed_png_shape

Convention = Literal["display", "seed"]
CONVENTIONS: tuple[str, ...] = ("display", "seed")
NAME_RE = re.compile(r"^img(?P<case>[A-Za-z0-9][A-Za-z0-9_.-]*?)-slice(?P<z>\d{1,6})\.txt$")
MAX_FILES = 50_000
MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 64 << 20
EDGE_TOLERANCE = 1e-6  # normalised coordinates this far outside [0, 1] are clipped, further is an error


class YoloError(Exception):
    """A problem in one file (and line); collected, never raised past the service."""

    def __init__(self, file: str, line: int | None, msg: str) -> None:
        super().__init__(msg)
        self.file, self.line, self.msg = file, line, msg

    @property
    def where(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True)
class YoloBox:
    cls: int
    xc: float
    yc: float
    w: float
    h: float
    line: int


@dataclass
class YoloFile:
    name: str  # as given (may include folders)
    case: str
    z: int
    boxes: list[YoloBox] = field(default_factory=list)


# --- reading uploads ----------------------------------------------------------------------
def _check_member_name(name: str) -> str | None:
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        return "absolute or non-portable path"
    if ".." in name.split("/"):
        return "path escapes the archive ('..')"
    return None


def expand_uploads(uploads: Iterable[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], list[YoloError]]:
    """Uploaded zips and .txt files → (name, content) of every prompt file; archive limits enforced."""
    files: list[tuple[str, bytes]] = []
    errors: list[YoloError] = []
    total = 0
    for filename, data in uploads:
        if data[:4] == b"PK\x03\x04" or filename.lower().endswith(".zip"):
            try:
                archive = zipfile.ZipFile(io.BytesIO(data))
                members = archive.infolist()
            except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
                errors.append(YoloError(filename, None, f"not a readable zip archive ({exc})"))
                continue
            if len(members) > MAX_FILES:
                errors.append(YoloError(filename, None, f"archive has {len(members)} entries; limit {MAX_FILES}"))
                continue
            declared = sum(m.file_size for m in members)
            if declared > MAX_TOTAL_BYTES:
                errors.append(YoloError(filename, None, f"archive expands to {declared} bytes; the limit is "
                                                        f"{MAX_TOTAL_BYTES}"))
                continue
            for member in members:
                name = member.filename
                if (reason := _check_member_name(name)) is not None:
                    errors.append(YoloError(f"{filename}/{name}", None, reason))
                    continue
                if member.is_dir() or name.startswith("__MACOSX/"):
                    continue
                if member.flag_bits & 0x1:
                    errors.append(YoloError(name, None, "encrypted archive entries are not accepted"))
                    continue
                if member.file_size > MAX_FILE_BYTES:
                    errors.append(YoloError(name, None, f"{member.file_size} bytes; a prompt file may have at most "
                                                        f"{MAX_FILE_BYTES}"))
                    continue
                try:
                    with archive.open(member) as fh:
                        content = fh.read(MAX_FILE_BYTES + 1)
                except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError, zlib.error) as exc:
                    errors.append(YoloError(name, None, f"cannot be extracted ({exc})"))
                    continue
                total += len(content)
                if len(content) > MAX_FILE_BYTES or total > MAX_TOTAL_BYTES:
                    errors.append(YoloError(name, None, "archive content exceeds the size limits"))
                    break
                files.append((name, content))
        else:
            if (reason := _check_member_name(filename)) is not None:
                errors.append(YoloError(filename, None, reason))
                continue
            total += len(data)
            if len(data) > MAX_FILE_BYTES or total > MAX_TOTAL_BYTES:
                errors.append(YoloError(filename, None, "upload exceeds the size limits"))
                continue
            files.append((filename, data))
        if len(files) > MAX_FILES:
            errors.append(YoloError(filename, None, f"more than {MAX_FILES} prompt files"))
            break
    return files, errors


# --- parsing ------------------------------------------------------------------------------
def parse_file(name: str, content: bytes) -> tuple[YoloFile | None, list[YoloError]]:
    """Parse one prompt file; errors name ``file:line``."""
    base = posixpath.basename(name)
    match = NAME_RE.match(base)
    if match is None:
        return None, [YoloError(name, None, "file name must look like img{CASE}-slice{ZZZ}.txt")]
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, [YoloError(name, None, "not UTF-8 text")]
    parsed = YoloFile(name, match["case"], int(match["z"]))
    errors: list[YoloError] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            parsed.boxes.append(parse_line(line, lineno))
        except ValueError as exc:
            errors.append(YoloError(name, lineno, str(exc)))
    return parsed, errors


def parse_line(line: str, lineno: int) -> YoloBox:
    parts = line.split()
    if len(parts) != 5:
        raise ValueError(f"expected 5 fields 'class xc yc w h', got {len(parts)}")
    if not re.fullmatch(r"\d{1,6}", parts[0]):
        raise ValueError(f"class {parts[0]!r} is not a non-negative integer")
    try:
        xc, yc, w, h = (float(p) for p in parts[1:])
    except ValueError as exc:
        raise ValueError(f"coordinates must be numbers ({exc})") from exc
    if not all(math.isfinite(v) for v in (xc, yc, w, h)):
        raise ValueError("coordinates must be finite")
    if w <= 0 or h <= 0:
        raise ValueError(f"width and height must be positive (w={w:g}, h={h:g})")
    x0, y0, x1, y1 = xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
    if min(x0, y0) < -EDGE_TOLERANCE or max(x1, y1) > 1 + EDGE_TOLERANCE:
        raise ValueError("box extends outside the image (normalised coordinates must lie in [0, 1])")
    return YoloBox(int(parts[0]), xc, yc, w, h, lineno)


def normalise_case(case: str) -> str:
    """Case ids match with or without zero padding: '0001' ~ '1'."""
    return (case.lstrip("0") or "0") if case.isdigit() else case


# --- coordinates --------------------------------------------------------------------------
def _clip01(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def yolo_to_pixels(b: YoloBox, rows: int, cols: int) -> Box:
    """Normalised centre format → pixel box on a ``rows × cols`` PNG."""
    return (
        _clip01(b.xc - b.w / 2) * cols,
        _clip01(b.yc - b.h / 2) * rows,
        _clip01(b.xc + b.w / 2) * cols,
        _clip01(b.yc + b.h / 2) * rows,
    )


def pixels_to_yolo(box: Box, rows: int, cols: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return ((x0 + x1) / 2 / cols, (y0 + y1) / 2 / rows, (x1 - x0) / cols, (y1 - y0) / rows)


class SeedMap:
    """The study's PNG frame of ``original[:, :, z]`` ⇄ our display frame of slice ``k``."""

    def __init__(self, orientation: Orientation) -> None:
        self.orientation = orientation
        self.rows, self.cols = seed_png_shape(orientation)
        self.nz = orientation.original_shape[2]
        k0, d00 = seed_box_to_display((0, 0, 0, 0), 0, orientation)  # raises ValueError if z is not axial
        _, d10 = seed_box_to_display((1, 0, 1, 0), 0, orientation)
        _, d01 = seed_box_to_display((0, 1, 0, 1), 0, orientation)
        b = np.array(d00[:2])
        a = np.column_stack([np.array(d10[:2]) - b, np.array(d01[:2]) - b])
        self._a_inv, self._b = np.linalg.inv(a), b
        self._k_flipped = k0 != 0

    def to_display(self, box: Box, z: int) -> tuple[int, Box]:
        return seed_box_to_display(box, z, self.orientation)

    def z_of(self, k: int) -> int:
        return self.nz - 1 - k if self._k_flipped else k

    def from_display(self, box: Box) -> Box:
        corners = [self._a_inv @ (np.array(p, dtype=float) - self._b) for p in ((box[0], box[1]), (box[2], box[3]))]
        xs, ys = sorted(float(c[0]) for c in corners), sorted(float(c[1]) for c in corners)
        return (xs[0], ys[0], xs[1], ys[1])


# --- writing ------------------------------------------------------------------------------
def format_number(v: float) -> str:
    """Fixed-point, 12 decimals, trailing zeros dropped (1e-12 of the image ≪ any pixel)."""
    text = f"{v:.12f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def format_line(cls: int, values: tuple[float, float, float, float]) -> str:
    return " ".join([str(cls), *(format_number(v) for v in values)])


def file_name(case: str, z: int) -> str:
    return f"img{case}-slice{z:03d}.txt"


def write_zip(files: dict[str, list[str]]) -> bytes:
    """name → lines; an empty list writes an empty file (a seen slice)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            lines = files[name]
            archive.writestr(name, "".join(line + "\n" for line in lines))
    return buffer.getvalue()
