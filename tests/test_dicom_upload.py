"""DICOM CT series upload: zip or several parts → the NIfTI SimpleITK reads; refusals store nothing."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.valuerep import format_number_as_ds

from tests.conftest import CT_DIR, TOTALSEG_MAP
from tests.dicom_helpers import reorient, sitk_nifti, write_series, zip_series

CT = CT_DIR / "example_ct_sm.nii.gz"
SEG = CT_DIR / "example_seg.nii.gz"
URL = "/api/v1/datasets/{}/volumes"


def stored_files(prefix: str = "") -> list[str]:
    from app.core.storage import get_storage

    root = Path(get_storage().root)
    return sorted(str(p.relative_to(root)) for p in (root / prefix).rglob("*") if p.is_file())


def post(client: Any, tokens: Any, dataset_id: int, parts: list[tuple[str, bytes]], case_id: str = "d1",
         reference: Path | None = None, **form: str) -> Any:
    files: list[tuple[str, tuple[str, bytes, str]]] = [
        ("image", (name, data, "application/octet-stream")) for name, data in parts
    ]
    if reference is not None:
        files.append(("reference", (reference.name, reference.read_bytes(), "application/gzip")))
    return client.post(URL.format(dataset_id), files=files, data={"case_id": case_id, **form},
                       headers=tokens.headers("researcher"))


def as_zip(paths: list[Path], arcnames: list[str] | None = None) -> list[tuple[str, bytes]]:
    return [("series.zip", zip_series(paths, arcnames=arcnames))]


def as_parts(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


def downloaded(client: Any, tokens: Any, volume_id: int) -> nib.Nifti1Image:
    response = client.get(f"/api/v1/volumes/{volume_id}/image", headers=tokens.headers("researcher"))
    assert response.status_code == 200, response.text
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def assert_same_as_sitk(ours: nib.Nifti1Image, paths: list[Path], tmp_path: Path) -> None:
    ref = nib.load(str(sitk_nifti(paths, tmp_path / "sitk.nii.gz")))
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(ours.dataobj, dtype=np.float64), np.asarray(ref.dataobj))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)


def canonical(volume_id: int) -> np.ndarray:
    from app.core.storage import get_storage

    return np.load(io.BytesIO(get_storage().read_bytes(f"volumes/{volume_id}/canonical.npy")))


CASES = {  # orientation (row, column, slice order), slope, intercept, stored type
    "axial": (("L", "P", "S"), 1.0, 0.0, "int16"),
    "flipped-permuted": (("P", "L", "I"), 0.5, -1024.0, "int16"),
    "sagittal": (("P", "I", "L"), 1.0, -2048.0, "uint16"),
    "coronal-ras": (("R", "S", "A"), 0.5, -2048.0, "uint16"),
}


@pytest.mark.parametrize("case", CASES)
def test_zip_upload_equals_simpleitk(client, tokens, dataset, tmp_path, case):
    orientation, slope, intercept, dtype = CASES[case]
    paths = write_series(CT, tmp_path / "series", orientation=orientation, slope=slope, intercept=intercept,
                         dtype=dtype)
    response = post(client, tokens, dataset["id"], as_zip(paths))
    assert response.status_code == 201, response.text
    volume = response.json()
    ours = downloaded(client, tokens, volume["id"])
    assert_same_as_sitk(ours, paths, tmp_path)
    assert ours.get_data_dtype() == np.int16  # integral HU that fit
    # The same anatomy as the NIfTI it came from: the canonical (RAS) cache equals the source's.
    source = nib.as_closest_canonical(nib.load(str(CT)))
    np.testing.assert_array_equal(canonical(volume["id"]), np.asarray(source.dataobj))
    assert volume["source_format"] == "dicom"
    assert volume["n_slices"] == 30
    first = pydicom.dcmread(paths[0])
    assert volume["study_instance_uid"] == first.StudyInstanceUID
    assert volume["series_instance_uid"] == first.SeriesInstanceUID
    assert volume["frame_of_reference_uid"] == first.FrameOfReferenceUID
    png = client.get(f"/api/v1/volumes/{volume['id']}/slices/12.png", headers=tokens.headers("annotator"))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_parts_upload_with_odd_names_equals_simpleitk(client, tokens, dataset, tmp_path):
    names = [f"IM_{k * 7 % 30}" for k in range(30)]
    names[3], names[11] = "x.dcm", "noextension"
    paths = write_series(CT, tmp_path / "series", orientation=("A", "R", "S"), slope=0.5, intercept=-1024.0,
                         names=names, seed=3)
    response = post(client, tokens, dataset["id"], as_parts(paths))
    assert response.status_code == 201, response.text
    assert_same_as_sitk(downloaded(client, tokens, response.json()["id"]), paths, tmp_path)


def test_fractional_values_are_float32(client, tokens, dataset, tmp_path):
    image = nib.load(str(CT))
    array = np.asarray(image.dataobj).astype(np.float64)[:40, :30, :8] + 0.5 * (np.arange(8) % 2)
    paths = write_series((array, image.affine), tmp_path / "series", slope=0.5, intercept=-1024.0)
    response = post(client, tokens, dataset["id"], as_zip(paths))
    assert response.status_code == 201, response.text
    ours = downloaded(client, tokens, response.json()["id"])
    assert ours.get_data_dtype() == np.float32
    assert_same_as_sitk(ours, paths, tmp_path)


def test_headers_zip_lists_the_slices_in_nifti_order(client, tokens, dataset, tmp_path):
    from app.core.storage import get_storage
    from app.imaging.dicom import load_headers

    paths = write_series(CT, tmp_path / "series", orientation=("P", "L", "I"))
    volume = post(client, tokens, dataset["id"], as_zip(paths)).json()
    local = tmp_path / "headers.zip"
    local.write_bytes(get_storage().read_bytes(f"volumes/{volume['id']}/dicom/headers.zip"))
    with zipfile.ZipFile(local) as zf:
        assert sorted(zf.namelist()) == [f"{k:05d}.dcm" for k in range(30)]
    headers = load_headers(local)
    affine = np.asarray(volume["affine"])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    by_sop = {pydicom.dcmread(p).SOPInstanceUID: p for p in paths}
    for k, ds in enumerate(headers):
        assert "PixelData" not in ds
        assert ds.SOPInstanceUID in by_sop and ds.Modality == "CT" and ds.Rows == 122 and ds.Columns == 101
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], (lps @ [0, 0, k, 1])[:3],
                                   atol=1e-4)


def test_reference_label_map_on_converted_geometry(client, tokens, dataset, tmp_path):
    orientation = ("P", "L", "I")
    paths = write_series(CT, tmp_path / "series", orientation=orientation)
    seg = nib.load(str(SEG))
    labels, affine = reorient(np.asarray(seg.dataobj), seg.affine, orientation)
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(ref))
    response = post(client, tokens, dataset["id"], as_zip(paths), reference=ref,
                    reference_map=json.dumps(TOTALSEG_MAP), reference_other="background")
    assert response.status_code == 201, response.text
    assert response.json()["has_reference"] and response.json()["reference_labels"]
    misplaced = tmp_path / "misplaced.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj).astype(np.uint8), seg.affine), str(misplaced))
    refused = post(client, tokens, dataset["id"], as_zip(paths), case_id="d2", reference=misplaced,
                   reference_map=json.dumps(TOTALSEG_MAP), reference_other="background")
    assert refused.status_code == 422 and "reference" in refused.json()["detail"]


def test_nifti_upload_is_unchanged(client, tokens, dataset):
    response = post(client, tokens, dataset["id"], [(CT.name, CT.read_bytes())])
    assert response.status_code == 201, response.text
    assert response.json()["source_format"] == "nifti" and response.json()["series_instance_uid"] is None


# --- refusals --------------------------------------------------------------------------------------
def _small(tmp_path: Path, name: str = "series", **kw: Any) -> list[Path]:
    image = nib.load(str(CT))
    return write_series((np.asarray(image.dataobj)[:40, :30, :6], image.affine), tmp_path / name, **kw)


def _set(path: Path, **attrs: Any) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path)


def mixed(tmp_path: Path) -> list[tuple[str, bytes]]:
    a, b = _small(tmp_path, "a"), _small(tmp_path, "b", names=[f"B{k}" for k in range(6)])
    return as_zip(a + b[:1])


def missing_middle(tmp_path: Path) -> list[tuple[str, bytes]]:
    paths = sorted(_small(tmp_path, shuffle=False), key=lambda p: int(p.name.split("_")[1]))
    return as_zip(paths[:3] + paths[4:])


def mr(tmp_path: Path) -> list[tuple[str, bytes]]:
    return as_parts(_small(tmp_path, modality="MR"))


def orientation(tmp_path: Path) -> list[tuple[str, bytes]]:
    paths = _small(tmp_path)
    _set(paths[2], ImageOrientationPatient=[format_number_as_ds(v) for v in (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)])
    return as_zip(paths)


def single(tmp_path: Path) -> list[tuple[str, bytes]]:
    return as_parts(_small(tmp_path)[:1])


def zip_slip(tmp_path: Path) -> list[tuple[str, bytes]]:
    paths = _small(tmp_path)
    return as_zip(paths, arcnames=[p.name for p in paths[:-1]] + ["../../evil.dcm"])


def not_dicom(tmp_path: Path) -> list[tuple[str, bytes]]:
    paths = _small(tmp_path)
    paths[1].write_bytes(b"hello")
    return as_parts(paths)


def duplicate(tmp_path: Path) -> list[tuple[str, bytes]]:
    paths = _small(tmp_path)
    shutil.copy(paths[0], tmp_path / "copy")
    return as_parts([*paths, tmp_path / "copy"])


def tilted(tmp_path: Path) -> list[tuple[str, bytes]]:
    paths = _small(tmp_path)
    for path in paths:  # each slice 1 mm further right than the one below: a sheared (gantry-tilt) stack
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _set(path, ImagePositionPatient=[format_number_as_ds(v) for v in (x + ds.InstanceNumber, y, z)])
    return as_zip(paths)


def truncated(tmp_path: Path) -> list[tuple[str, bytes]]:
    paths = _small(tmp_path)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 1000])
    return as_parts(paths)


REFUSALS = {  # what is sent → a word the message must hold
    "mixed series": (mixed, "different series"),
    "missing middle slice": (missing_middle, "missing"),
    "MR modality": (mr, "not CT"),
    "inconsistent orientation": (orientation, "ImageOrientationPatient"),
    "single file": (single, "single DICOM file"),
    "zip slip": (zip_slip, "unsafe member name"),
    "not a DICOM part": (not_dicom, "not a DICOM file"),
    "duplicate slice": (duplicate, "same position"),
    "tilted stack": (tilted, "do not line up"),
    "truncated pixels": (truncated, "cannot decode the pixels"),
}


@pytest.mark.parametrize("problem", REFUSALS)
def test_refusals_store_nothing(client, tokens, dataset, tmp_path, problem):
    make, word = REFUSALS[problem]
    response = post(client, tokens, dataset["id"], make(tmp_path))
    assert response.status_code == 422, response.text
    assert word in response.json()["detail"], response.json()["detail"]
    listed = client.get(URL.format(dataset["id"]), headers=tokens.headers("researcher"))
    assert listed.json() == [] and stored_files() == []


def test_too_many_voxels_is_refused_before_decoding(client, tokens, dataset, tmp_path, monkeypatch):
    from app.core.config import get_settings

    paths = _small(tmp_path)
    monkeypatch.setenv("CROWDSAM_MAX_VOXELS", str(40 * 30 * 6 - 1))
    get_settings.cache_clear()
    try:
        response = post(client, tokens, dataset["id"], as_zip(paths))
    finally:
        monkeypatch.delenv("CROWDSAM_MAX_VOXELS")
        get_settings.cache_clear()
    assert response.status_code == 422 and "exceed the limit" in response.json()["detail"]
    assert stored_files() == []


def test_over_the_memory_budget_is_413_before_decoding(client, tokens, dataset, tmp_path, monkeypatch):
    from app.core.config import get_settings

    paths = _small(tmp_path)
    monkeypatch.setenv("CROWDSAM_UPLOAD_MEMORY_BYTES", str(40 * 30 * 6 * 6 - 1))
    get_settings.cache_clear()
    try:
        response = post(client, tokens, dataset["id"], as_parts(paths))
    finally:
        monkeypatch.delenv("CROWDSAM_UPLOAD_MEMORY_BYTES")
        get_settings.cache_clear()
    assert response.status_code == 413 and "CROWDSAM_UPLOAD_MEMORY_BYTES" in response.json()["detail"]
    assert stored_files() == []


GARBAGE = {  # image parts → status
    "damaged zip": ([("s.zip", b"PK\x03\x04" + b"\x00" * 50)], 422),
    "zip of text": ([], 422),  # built in the test
    "empty parts": ([("a", b""), ("b", b"")], 422),
    "preamble only": ([("a", b"\x00" * 128 + b"DICM"), ("b", b"\x00" * 128 + b"DICM")], 422),
}


@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_is_422(client, tokens, dataset, tmp_path, kind):
    parts, status = GARBAGE[kind]
    if kind == "zip of text":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr("readme.txt", "hello")
            zf.writestr("sub/IM_1", "not dicom either")
        parts = [("s.zip", buffer.getvalue())]
    response = post(client, tokens, dataset["id"], parts)
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith("image:")
    assert stored_files() == []
