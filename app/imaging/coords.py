"""The one coordinate contract (DESIGN.md section 3): original ⇄ canonical (RAS+) ⇄ display.

- *original*: the array exactly as uploaded, with its affine.
- *canonical*: ``nibabel.as_closest_canonical`` of it — axes R, A, S increasing.
- *display* of axial slice ``k``: ``canonical[::-1, ::-1, k].T`` — rows run anterior→posterior,
  columns patient-right→left (radiological convention). Boxes ``[x0, y0, x1, y1]`` live here:
  x = column, y = row, origin at the top-left corner of the top-left pixel, x1/y1 exclusive.

Index maps act on integer voxel indices; *edge* maps act on continuous coordinates where pixel
``i`` spans ``[i, i + 1)`` — boxes use edge maps so a box maps to exactly the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)

RAS = axcodes2ornt(("R", "A", "S"))

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Orientation:
    """How an original array maps onto its closest-canonical RAS+ grid."""

    original_shape: tuple[int, int, int]
    to_canonical: npt.NDArray[np.float64]  # nibabel ornt: row a = (canonical axis, flip) of original axis a

    @classmethod
    def from_affine(cls, affine: npt.ArrayLike, shape: Sequence[int]) -> Orientation:
        ornt = io_orientation(np.asarray(affine, dtype=float))
        return cls(tuple(int(s) for s in shape[:3]), ornt_transform(ornt, RAS))  # type: ignore[arg-type]

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        shape = [0, 0, 0]
        for axis, (target, _flip) in enumerate(self.to_canonical):
            shape[int(target)] = self.original_shape[axis]
        return (shape[0], shape[1], shape[2])

    # --- whole arrays -------------------------------------------------------------------
    def canonical(self, data: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        return np.asarray(apply_orientation(data, self.to_canonical))

    def original(self, canonical: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        back = _inverse_ornt(self.to_canonical)
        return np.asarray(apply_orientation(canonical, back))

    # --- points -------------------------------------------------------------------------
    def original_index_to_canonical(self, index: Sequence[int]) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for axis, (target, flip) in enumerate(self.to_canonical):
            n = self.original_shape[axis]
            out[int(target)] = int(index[axis]) if flip > 0 else n - 1 - int(index[axis])
        return (out[0], out[1], out[2])

    def original_edge_to_canonical(self, point: Sequence[float]) -> tuple[float, float, float]:
        out = [0.0, 0.0, 0.0]
        for axis, (target, flip) in enumerate(self.to_canonical):
            n = self.original_shape[axis]
            out[int(target)] = float(point[axis]) if flip > 0 else n - float(point[axis])
        return (out[0], out[1], out[2])

    def canonical_axis_of(self, original_axis: int) -> tuple[int, int]:
        target, flip = self.to_canonical[original_axis]
        return int(target), int(flip)


def _inverse_ornt(ornt: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = (axis, flip)
    return inverse


def orientation_codes(affine: npt.ArrayLike) -> str:
    return "".join(str(c) for c in aff2axcodes(np.asarray(affine, dtype=float)))


# --- display ⇄ canonical (one axial slice) ------------------------------------------------
def display_slice(canonical: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.generic]:
    """What an annotator sees for slice ``k``: ``canonical[::-1, ::-1, k].T``."""
    return np.ascontiguousarray(canonical[::-1, ::-1, k].T)


def display_to_canonical_slice(display: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """Inverse of :func:`display_slice` for one 2D slice."""
    return np.ascontiguousarray(display.T[::-1, ::-1])


def display_shape(canonical_shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) = (height, width) of a display slice."""
    return int(canonical_shape[1]), int(canonical_shape[0])


def display_box_to_canonical(box: Sequence[float], canonical_shape: Sequence[int]) -> Box:
    """Display box → ``[i0, j0, i1, j1]`` edges on canonical axes 0 (R) and 1 (A)."""
    nx, ny = canonical_shape[0], canonical_shape[1]
    x0, y0, x1, y1 = (float(v) for v in box)
    return (nx - x1, ny - y1, nx - x0, ny - y0)


def canonical_box_to_display(box: Sequence[float], canonical_shape: Sequence[int]) -> Box:
    """Inverse of :func:`display_box_to_canonical` (the map is its own inverse)."""
    return display_box_to_canonical(box, canonical_shape)


def mask_bbox_display(mask2d: npt.NDArray[np.bool_]) -> Box | None:
    """Tight display box ``[x0, y0, x1, y1)`` around a 2D display mask, or None when empty."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


# --- the study's seed PNG convention ------------------------------------------------------
def seed_box_to_display(
    box: Sequence[float], z: int, orientation: Orientation
) -> tuple[int, Box]:
    """Map a box on the study's PNG of ``original[:, :, z]`` to ``(k, display box)``.

    The study wrote PNG ``p`` so that ``original[:, :, z] = fliplr(flipud(rot90(p)))``,
    i.e. ``p[r, c] = original[c, J - 1 - r, z]`` with ``J = original.shape[1]``.
    Requires the original third axis to be the canonical S axis.
    """
    target, _flip = orientation.canonical_axis_of(2)
    if target != 2:
        raise ValueError("seed convention needs the image's third axis to be axial (S/I)")
    _ni, nj, _nk = orientation.original_shape
    x0, y0, x1, y1 = (float(v) for v in box)
    corners = []
    for x, y in ((x0, y0), (x1, y1)):
        i_edge, j_edge = x, nj - y
        ci, cj, _ = orientation.original_edge_to_canonical((i_edge, j_edge, 0.0))
        corners.append((ci, cj))
    _, _, k = orientation.original_index_to_canonical((0, 0, z))
    cbox = (
        min(corners[0][0], corners[1][0]),
        min(corners[0][1], corners[1][1]),
        max(corners[0][0], corners[1][0]),
        max(corners[0][1], corners[1][1]),
    )
    return k, canonical_box_to_display(cbox, orientation.canonical_shape)


def seed_png_shape(orientation: Orientation) -> tuple[int, int]:
    """(rows, cols) of the study's PNG for this volume: ``(J, I)`` of the original array."""
    ni, nj, _ = orientation.original_shape
    return nj, ni
