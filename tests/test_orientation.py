"""Slice PNGs follow the display contract (DESIGN.md §3) whatever the upload's orientation.

Radiological convention: anterior up, the patient's right on the screen's left. On
``example_ct_sm`` slice 15 the liver (patient right) sits in the left third of the image and the
spleen (patient left) in the right third; the aorta lies above (anterior to) the spinal cord.
The same pixels come back for reoriented copies of the volume (LPS and odd permutations).
"""

from __future__ import annotations

import gzip
import io
import json
from functools import cache

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform
from PIL import Image

from tests.conftest import CT_DIR, TOTALSEG_MAP

CT = CT_DIR / "example_ct_sm.nii.gz"
SEG = CT_DIR / "example_seg.nii.gz"
SLICE = 15
LIVER, SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT, AORTA = 5, 1, 2, 3, 52
SPINAL_CORD = 79  # TotalSegmentator v2 value; not a dataset label, used only on the raw file
ORIENTATIONS = ["RAS", "LPS", "LAS", "ASR", "PIL", "SLA", "IRP"]


def display(canonical: np.ndarray, k: int) -> np.ndarray:
    """The contract written out independently of app code: rows A→P, columns patient R→L."""
    return canonical[::-1, ::-1, k].T


def windowed(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return np.clip(np.rint((hu.astype(np.float64) - lo) * 255.0 / width), 0, 255).astype(np.uint8)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    assert rows.size, "organ absent from slice"
    return float(rows.mean()), float(cols.mean())


def canonical_of(data: bytes) -> np.ndarray:
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return np.asanyarray(nib.as_closest_canonical(img).dataobj)


@cache
def reoriented(codes: str) -> tuple[bytes, bytes]:
    """The sample CT and its reference, reoriented to ``codes`` (data and affine together)."""
    out = []
    for path in (CT, SEG):
        img = nib.load(str(path))
        if codes != "RAS":
            img = img.as_reoriented(ornt_transform(axcodes2ornt(tuple("RAS")), axcodes2ornt(tuple(codes))))
        out.append(gzip.compress(img.to_bytes(), compresslevel=1))
    return out[0], out[1]


def test_reoriented_copies_really_differ():
    assert nib.aff2axcodes(nib.Nifti1Image.from_bytes(gzip.decompress(reoriented("LPS")[0])).affine) == tuple("LPS")
    assert nib.aff2axcodes(nib.Nifti1Image.from_bytes(gzip.decompress(reoriented("PIL")[0])).affine) == tuple("PIL")
    assert nib.Nifti1Image.from_bytes(gzip.decompress(reoriented("ASR")[0])).shape == (101, 30, 122)


def _upload(client, tokens, dataset_id: int, codes: str) -> dict:  # type: ignore[no-untyped-def]
    image, reference = reoriented(codes)
    response = client.post(
        f"/api/v1/datasets/{dataset_id}/volumes",
        files={"image": (f"ct_{codes}.nii.gz", image, "application/gzip"),
               "reference": (f"seg_{codes}.nii.gz", reference, "application/gzip")},
        data={"case_id": f"sm_{codes}", "reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "background"},
        headers=tokens.headers("researcher"),
    )
    assert response.status_code == 201, response.text
    return response.json()


def _png(client, tokens, volume_id: int, k: int) -> tuple[bytes, np.ndarray]:  # type: ignore[no-untyped-def]
    response = client.get(f"/api/v1/volumes/{volume_id}/slices/{k}.png", headers=tokens.headers("annotator"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(response.content))
    assert img.mode == "L"
    return response.content, np.asarray(img)


def test_raw_reference_matches_radiological_convention():
    """On the file itself (no app code): liver left third, spleen right third, aorta above the cord."""
    labels = display(canonical_of(SEG.read_bytes()), SLICE)
    width = labels.shape[1]
    assert centroid(labels == LIVER)[1] < width / 3
    assert centroid(labels == SPLEEN)[1] > 2 * width / 3
    assert centroid(labels == KIDNEY_RIGHT)[1] < centroid(labels == KIDNEY_LEFT)[1]
    assert centroid(labels == AORTA)[0] < centroid(labels == SPINAL_CORD)[0]


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_slice_png_is_display_of_canonical(client, tokens, dataset, codes):
    volume = _upload(client, tokens, dataset["id"], codes)
    assert volume["orientation"] == codes
    assert volume["canonical_shape"] == [122, 101, 30]
    assert volume["n_slices"] == 30
    assert volume["display_size"] == [122, 101]
    assert sorted(volume["reference_labels"]) == sorted(TOTALSEG_MAP.values())

    _, pixels = _png(client, tokens, volume["id"], SLICE)
    ct_canonical = canonical_of(reoriented(codes)[0])
    assert pixels.shape == (101, 122)
    np.testing.assert_array_equal(pixels, windowed(display(ct_canonical, SLICE), 40, 400))

    # The stored reference (downloaded, in dataset values) rendered through the same transform.
    ref = client.get(f"/api/v1/volumes/{volume['id']}/reference", headers=tokens.headers("researcher"))
    assert ref.status_code == 200
    stored = nib.Nifti1Image.from_bytes(gzip.decompress(ref.content))
    assert nib.aff2axcodes(stored.affine) == tuple(codes)
    labels = display(canonical_of(ref.content), SLICE)
    width = pixels.shape[1]
    _, liver_col = centroid(labels == dataset["labels"]["liver"])
    _, spleen_col = centroid(labels == dataset["labels"]["spleen"])
    assert liver_col < width / 3, f"liver centroid at column {liver_col:.1f} of {width}"
    assert spleen_col > 2 * width / 3, f"spleen centroid at column {spleen_col:.1f} of {width}"
    # The organ really is bright-ish soft tissue in the PNG where the reference says it is.
    liver_mean = pixels[labels == dataset["labels"]["liver"]].mean()
    assert 100 < liver_mean < 200, liver_mean


def test_every_orientation_gives_the_same_png(client, tokens, dataset):
    ras = _upload(client, tokens, dataset["id"], "RAS")
    ras_pngs = {k: _png(client, tokens, ras["id"], k)[0] for k in (0, SLICE, 29)}
    for codes in ORIENTATIONS[1:]:
        other = _upload(client, tokens, dataset["id"], codes)
        for k, expected in ras_pngs.items():
            assert _png(client, tokens, other["id"], k)[0] == expected, (codes, k)


def test_slice_order_runs_inferior_to_superior(client, tokens, dataset):
    """k follows the canonical S axis: on an IRP upload, slice 0 is still the most inferior one."""
    ras = _upload(client, tokens, dataset["id"], "RAS")
    irp = _upload(client, tokens, dataset["id"], "IRP")
    ct = np.asanyarray(nib.load(str(CT)).dataobj)
    _, first = _png(client, tokens, irp["id"], 0)
    np.testing.assert_array_equal(first, windowed(ct[::-1, ::-1, 0].T, 40, 400))
    assert _png(client, tokens, ras["id"], 0)[0] != _png(client, tokens, ras["id"], 29)[0]
