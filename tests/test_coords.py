"""Property tests of the coordinate contract (app/imaging/coords.py, DESIGN.md §3).

Every map is checked against an independent construction: nibabel's ``as_closest_canonical`` for
original → canonical, rasterised boxes for display ⇄ canonical, and the study's own
``fliplr(flipud(rot90(p)))`` for its seed PNGs.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.imaging.coords import (
    Orientation,
    canonical_box_to_display,
    display_box_to_canonical,
    display_shape,
    display_slice,
    display_to_canonical_slice,
    mask_bbox_display,
    orientation_codes,
    seed_box_to_display,
    seed_png_shape,
)

# All 48 axis orders × flips: (permutation of world axes, sign per array axis).
ALL_ORIENTATIONS = [
    (perm, signs)
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
]
AXIAL_THIRD = [(p, s) for p, s in ALL_ORIENTATIONS if p[2] == 2]  # third array axis along S/I
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def clean_state() -> None:
    """Pure functions: skip conftest's per-test database/Redis/store reset (it dominates runtime)."""


def affine_for(perm: tuple[int, ...], signs: tuple[int, ...], spacing=(0.8, 1.1, 2.5)) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Array axis a runs along world axis perm[a] with direction signs[a]."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, (world, sign) in enumerate(zip(perm, signs, strict=True)):
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    return affine


def test_there_are_48_orientations():
    codes = {orientation_codes(affine_for(p, s)) for p, s in ALL_ORIENTATIONS}
    assert len(codes) == 48


shapes = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7))


@pytest.mark.parametrize(("perm", "signs"), ALL_ORIENTATIONS, ids=lambda v: "".join(map(str, v)))
@FAST
@given(shape=shapes, data=st.data())
def test_original_canonical_round_trip(perm, signs, shape, data):
    affine = affine_for(perm, signs)
    volume = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)  # every voxel unique
    orientation = Orientation.from_affine(affine, shape)

    canonical = orientation.canonical(volume)
    expected = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(volume, affine)).dataobj)
    np.testing.assert_array_equal(canonical, expected)
    assert orientation.canonical_shape == canonical.shape
    np.testing.assert_array_equal(orientation.original(canonical), volume)

    index = data.draw(st.tuples(*(st.integers(0, n - 1) for n in shape)))
    ci = orientation.original_index_to_canonical(index)
    assert canonical[ci] == volume[index]
    # Edge map: the voxel's two corners land on the canonical voxel's two corners.
    lo = orientation.original_edge_to_canonical(index)
    hi = orientation.original_edge_to_canonical(tuple(i + 1 for i in index))
    assert tuple(min(a, b) for a, b in zip(lo, hi, strict=True)) == ci
    assert all(abs(a - b) == 1 for a, b in zip(lo, hi, strict=True))


@FAST
@given(perm=st.permutations(range(3)), signs=st.tuples(*[st.sampled_from((1, -1))] * 3),
       angle=st.floats(-0.3, 0.3))
def test_oblique_affine_uses_closest_canonical(perm, signs, angle):
    """A slightly rotated scanner frame maps like its closest axis-aligned orientation."""
    affine = affine_for(tuple(perm), signs)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    shape = (3, 4, 5)
    volume = np.arange(60, dtype=np.int32).reshape(shape)
    tilted = Orientation.from_affine(rotation @ affine, shape)
    np.testing.assert_array_equal(
        tilted.canonical(volume),
        np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(volume, rotation @ affine)).dataobj),
    )
    np.testing.assert_array_equal(tilted.canonical(volume), Orientation.from_affine(affine, shape).canonical(volume))


# --- display ⇄ canonical ------------------------------------------------------------------------
@FAST
@given(nx=st.integers(1, 40), ny=st.integers(1, 40), nz=st.integers(1, 5), data=st.data())
def test_display_slice_round_trip(nx, ny, nz, data):
    canonical = np.arange(nx * ny * nz).reshape(nx, ny, nz)
    k = data.draw(st.integers(0, nz - 1))
    shown = display_slice(canonical, k)
    assert shown.shape == display_shape(canonical.shape) == (ny, nx)
    # Top-left pixel = most anterior, most patient-right voxel (R and A are the high ends).
    assert shown[0, 0] == canonical[nx - 1, ny - 1, k]
    assert shown[ny - 1, 0] == canonical[nx - 1, 0, k]  # bottom-left: posterior, right
    assert shown[0, nx - 1] == canonical[0, ny - 1, k]  # top-right: anterior, left
    np.testing.assert_array_equal(display_to_canonical_slice(shown), canonical[:, :, k])


def _box(draw, width: int, height: int, integer: bool):  # type: ignore[no-untyped-def]
    if integer:
        x0, x1 = sorted(draw(st.lists(st.integers(0, width), min_size=2, max_size=2, unique=True)))
        y0, y1 = sorted(draw(st.lists(st.integers(0, height), min_size=2, max_size=2, unique=True)))
    else:
        x0, x1 = sorted(draw(st.lists(st.floats(0, width), min_size=2, max_size=2)))
        y0, y1 = sorted(draw(st.lists(st.floats(0, height), min_size=2, max_size=2)))
    return (x0, y0, x1, y1)


@FAST
@given(nx=st.integers(2, 64), ny=st.integers(2, 64), data=st.data())
def test_box_round_trip_float(nx, ny, data):
    box = _box(data.draw, nx, ny, integer=False)
    back = canonical_box_to_display(display_box_to_canonical(box, (nx, ny, 3)), (nx, ny, 3))
    np.testing.assert_allclose(back, box, atol=1e-9)
    i0, j0, i1, j1 = display_box_to_canonical(box, (nx, ny, 3))
    assert 0 <= i0 <= i1 <= nx and 0 <= j0 <= j1 <= ny
    assert np.isclose(i1 - i0, box[2] - box[0]) and np.isclose(j1 - j0, box[3] - box[1])


@FAST
@given(nx=st.integers(2, 64), ny=st.integers(2, 64), data=st.data())
def test_integer_box_covers_the_same_voxels(nx, ny, data):
    """A box rasterised on the display covers exactly the canonical voxels of the mapped box."""
    x0, y0, x1, y1 = _box(data.draw, nx, ny, integer=True)
    shown = np.zeros((ny, nx), dtype=bool)
    shown[y0:y1, x0:x1] = True
    assert mask_bbox_display(shown) == (x0, y0, x1, y1)
    canonical = display_to_canonical_slice(shown)
    i0, j0, i1, j1 = (int(v) for v in display_box_to_canonical((x0, y0, x1, y1), (nx, ny, 1)))
    expected = np.zeros((nx, ny), dtype=bool)
    expected[i0:i1, j0:j1] = True
    np.testing.assert_array_equal(canonical, expected)
    # And back: the canonical box, mapped to display, is the box we drew.
    assert canonical_box_to_display((i0, j0, i1, j1), (nx, ny, 1)) == (x0, y0, x1, y1)


@FAST
@given(mask=st.integers(1, 30).flatmap(
    lambda h: st.integers(1, 30).flatmap(
        lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
            lambda bits: np.array(bits, dtype=bool).reshape(h, w)))))
def test_mask_bbox_display_is_tight(mask):
    box = mask_bbox_display(mask)
    if not mask.any():
        assert box is None
        return
    assert box is not None
    x0, y0, x1, y1 = (int(v) for v in box)
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = True
    assert not (mask & ~inside).any(), "pixel outside the box"
    assert mask[y0, :].any() and mask[y1 - 1, :].any() and mask[:, x0].any() and mask[:, x1 - 1].any()


# --- the study's seed PNG convention ------------------------------------------------------------
def _seed_check(perm, signs, shape, box, z):  # type: ignore[no-untyped-def]
    """Rasterise ``box`` on the study's PNG, put it into the volume the study's way, compare."""
    orientation = Orientation.from_affine(affine_for(perm, signs), shape)
    rows, cols = seed_png_shape(orientation)
    png = np.zeros((rows, cols), dtype=bool)
    x0, y0, x1, y1 = box
    png[y0:y1, x0:x1] = True
    volume = np.zeros(shape, dtype=bool)
    volume[:, :, z] = np.fliplr(np.flipud(np.rot90(png)))  # the study's 3D assembly
    canonical = orientation.canonical(volume)
    k, display_box = seed_box_to_display(box, z, orientation)
    assert canonical[:, :, k].any(), "mapped to the wrong slice"
    assert mask_bbox_display(display_slice(canonical, k)) == display_box


@pytest.mark.parametrize(("perm", "signs"), AXIAL_THIRD, ids=lambda v: "".join(map(str, v)))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_seed_box_on_512x512(perm, signs, data):
    shape = (512, 512, 6)
    rows, cols = shape[1], shape[0]
    box = _box(data.draw, cols, rows, integer=True)
    _seed_check(perm, signs, shape, box, data.draw(st.integers(0, shape[2] - 1)))


@pytest.mark.parametrize(("perm", "signs"), AXIAL_THIRD, ids=lambda v: "".join(map(str, v)))
@FAST
@given(ni=st.integers(2, 30), nj=st.integers(2, 30), nk=st.integers(1, 4), data=st.data())
def test_seed_box_non_square(perm, signs, ni, nj, nk, data):
    """Non-square slices catch row/column mix-ups a 512×512 volume would hide."""
    box = _box(data.draw, ni, nj, integer=True)  # PNG is (J rows, I cols)
    _seed_check(perm, signs, (ni, nj, nk), box, data.draw(st.integers(0, nk - 1)))


@pytest.mark.parametrize(("perm", "signs"), [o for o in ALL_ORIENTATIONS if o[0][2] != 2][:4])
def test_seed_needs_axial_third_axis(perm, signs):
    with pytest.raises(ValueError, match="axial"):
        seed_box_to_display((0, 0, 2, 2), 0, Orientation.from_affine(affine_for(perm, signs), (4, 4, 4)))
