"""Volumes: metadata, list/get/delete, downloads, slice PNGs (range, window override, ETag/304)."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from tests.conftest import CT_DIR, TOTALSEG_MAP, upload

CT = CT_DIR / "example_ct_sm.nii.gz"
SEG = CT_DIR / "example_seg.nii.gz"


def stored_files(prefix: str = "") -> list[str]:
    from app.core.storage import get_storage

    root = Path(get_storage().root)
    return sorted(str(p.relative_to(root)) for p in (root / prefix).rglob("*") if p.is_file())


def png_pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def windowed(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return np.clip(np.rint((hu.astype(np.float64) - lo) * 255.0 / width), 0, 255).astype(np.uint8)


def test_upload_reports_the_volume(sm_volume, dataset):
    v = sm_volume
    assert v["dataset_id"] == dataset["id"] and v["case_id"] == "sm" and v["split"] == "train"
    assert v["shape"] == [122, 101, 30] and v["canonical_shape"] == [122, 101, 30]
    assert v["spacing"] == [3.0, 3.0, 3.0]
    assert v["orientation"] == "RAS"
    assert v["n_slices"] == 30 and v["display_size"] == [122, 101]
    assert v["dtype"] == "int16"
    np.testing.assert_allclose(v["affine"], nib.load(str(CT)).affine, atol=1e-4)
    assert v["has_reference"] is True
    assert sorted(v["reference_labels"]) == sorted(TOTALSEG_MAP.values())
    assert v["sha256"] == hashlib.sha256(CT.read_bytes()).hexdigest()
    assert v["size_bytes"] == CT.stat().st_size
    assert stored_files() == sorted(f"volumes/{v['id']}/{name}" for name in
                                    ("image.nii.gz", "canonical.npy", "reference.nii.gz"))


def test_list_and_get(client, tokens, dataset, sm_volume):
    second = upload(client, tokens, dataset["id"], CT, case_id="sm2", split="test")
    assert second.status_code == 201, second.text
    assert second.json()["has_reference"] is False and second.json()["reference_labels"] is None
    listed = client.get(f"/api/v1/datasets/{dataset['id']}/volumes", headers=tokens.headers("annotator"))
    assert listed.status_code == 200
    assert [(v["case_id"], v["split"]) for v in listed.json()] == [("sm", "train"), ("sm2", "test")]
    got = client.get(f"/api/v1/volumes/{sm_volume['id']}", headers=tokens.headers("annotator"))
    assert got.status_code == 200 and got.json() == sm_volume
    assert client.get("/api/v1/volumes/999", headers=tokens.headers("admin")).json() == {
        "detail": "volume 999 not found"
    }
    assert client.get("/api/v1/datasets/999/volumes", headers=tokens.headers("admin")).status_code == 404


def test_uncompressed_nii_is_accepted(client, tokens, dataset, tmp_path):
    raw = tmp_path / "ct.nii"
    raw.write_bytes(gzip.decompress(CT.read_bytes()))
    response = upload(client, tokens, dataset["id"], raw, case_id="raw")
    assert response.status_code == 201, response.text
    assert stored_files() == [f"volumes/{response.json()['id']}/canonical.npy",
                              f"volumes/{response.json()['id']}/image.nii"]
    image = client.get(f"/api/v1/volumes/{response.json()['id']}/image", headers=tokens.headers("researcher"))
    assert image.content == raw.read_bytes()
    assert 'filename="raw.nii"' in image.headers["content-disposition"]


def test_float_ct_renders_like_int(client, tokens, dataset, sm_volume, tmp_path):
    img = nib.load(str(CT))
    path = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), img.affine), str(path))
    response = upload(client, tokens, dataset["id"], path, case_id="float")
    assert response.status_code == 201, response.text
    assert response.json()["dtype"] == "float32"
    a = client.get(f"/api/v1/volumes/{sm_volume['id']}/slices/7.png", headers=tokens.headers("annotator"))
    b = client.get(f"/api/v1/volumes/{response.json()['id']}/slices/7.png", headers=tokens.headers("annotator"))
    np.testing.assert_array_equal(png_pixels(a.content), png_pixels(b.content))


def test_image_download_is_the_upload(client, tokens, sm_volume):
    response = client.get(f"/api/v1/volumes/{sm_volume['id']}/image", headers=tokens.headers("researcher"))
    assert response.status_code == 200
    assert response.content == CT.read_bytes()
    assert 'filename="sm.nii.gz"' in response.headers["content-disposition"]


def test_reference_download_is_remapped_to_dataset_values(client, tokens, dataset, sm_volume):
    response = client.get(f"/api/v1/volumes/{sm_volume['id']}/reference", headers=tokens.headers("researcher"))
    assert response.status_code == 200
    stored = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    source = nib.load(str(SEG))
    assert stored.shape == source.shape
    np.testing.assert_allclose(stored.affine, source.affine, atol=1e-4)
    got = np.asanyarray(stored.dataobj)
    src = np.asanyarray(source.dataobj)
    expected = np.zeros(src.shape, dtype=np.int32)
    for value, name in TOTALSEG_MAP.items():
        expected[src == int(value)] = dataset["labels"][name]
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.uint8  # values up to 52 fit


def test_reference_with_dataset_values_needs_no_map(client, tokens, dataset, tmp_path):
    """A reference already in the dataset's values uploads without reference_map."""
    source = nib.load(str(SEG))
    src = np.asanyarray(source.dataobj)
    clean = np.where(np.isin(src, [1, 2, 3, 5, 52]), src, 0).astype(np.uint8)
    path = tmp_path / "clean.nii.gz"
    nib.save(nib.Nifti1Image(clean, source.affine), str(path))
    response = upload(client, tokens, dataset["id"], CT, path, case_id="clean")
    assert response.status_code == 201, response.text
    assert sorted(response.json()["reference_labels"]) == sorted(TOTALSEG_MAP.values())


def test_reference_missing_is_404(client, tokens, dataset):
    vid = upload(client, tokens, dataset["id"], CT, case_id="noref").json()["id"]
    response = client.get(f"/api/v1/volumes/{vid}/reference", headers=tokens.headers("researcher"))
    assert response.status_code == 404
    assert "no reference" in response.json()["detail"]


def test_slice_out_of_range_is_404(client, tokens, sm_volume):
    vid = sm_volume["id"]
    for k in (30, 31, 1000, -1):
        response = client.get(f"/api/v1/volumes/{vid}/slices/{k}.png", headers=tokens.headers("annotator"))
        assert response.status_code == 404, k
        assert "out of range" in response.json()["detail"] and "0..29" in response.json()["detail"]
    assert client.get(f"/api/v1/volumes/{vid}/slices/abc.png", headers=tokens.headers("annotator")).status_code == 422
    assert client.get("/api/v1/volumes/999/slices/0.png", headers=tokens.headers("annotator")).status_code == 404


def test_window_override_changes_pixels(client, tokens, sm_volume):
    vid = sm_volume["id"]
    canonical = np.asanyarray(nib.as_closest_canonical(nib.load(str(CT))).dataobj)
    expected_display = canonical[::-1, ::-1, 12].T
    default = client.get(f"/api/v1/volumes/{vid}/slices/12.png", headers=tokens.headers("annotator"))
    lung = client.get(f"/api/v1/volumes/{vid}/slices/12.png?level=-600&width=1500", headers=tokens.headers("annotator"))
    assert default.status_code == lung.status_code == 200
    np.testing.assert_array_equal(png_pixels(default.content), windowed(expected_display, 40, 400))
    np.testing.assert_array_equal(png_pixels(lung.content), windowed(expected_display, -600, 1500))
    assert not np.array_equal(png_pixels(default.content), png_pixels(lung.content))
    assert default.headers["etag"] != lung.headers["etag"]
    for bad in ("width=0", "width=-5", "level=abc", "level=99999"):
        response = client.get(f"/api/v1/volumes/{vid}/slices/12.png?{bad}", headers=tokens.headers("annotator"))
        assert response.status_code == 422, bad


def test_dataset_window_is_the_default(client, tokens):
    ds = client.post("/api/v1/datasets", json={"name": "lung", "labels": {"lung": 1},
                                               "window": {"level": -600, "width": 1500},
                                               "annotators": ["annotator", "annotator2"]},
                     headers=tokens.headers("researcher")).json()
    vid = upload(client, tokens, ds["id"], CT, case_id="c").json()["id"]
    default = client.get(f"/api/v1/volumes/{vid}/slices/3.png", headers=tokens.headers("annotator"))
    explicit = client.get(f"/api/v1/volumes/{vid}/slices/3.png?level=-600&width=1500",
                          headers=tokens.headers("annotator"))
    assert default.content == explicit.content


def test_etag_and_304(client, tokens, sm_volume):
    url = f"/api/v1/volumes/{sm_volume['id']}/slices/15.png"
    first = client.get(url, headers=tokens.headers("annotator"))
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert "max-age" in first.headers["cache-control"]
    cached = client.get(url, headers={**tokens.headers("annotator"), "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["etag"] == etag
    stale = client.get(url, headers={**tokens.headers("annotator"), "If-None-Match": '"something-else"'})
    assert stale.status_code == 200 and stale.content == first.content
    for header in (f'"x", {etag}', f"W/{etag}", "*"):
        listed = client.get(url, headers={**tokens.headers("annotator"), "If-None-Match": header})
        assert listed.status_code == 304, header
    other_slice = client.get(url.replace("15.png", "16.png"), headers=tokens.headers("annotator"))
    assert other_slice.headers["etag"] != etag
    # The ETag never bypasses auth.
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 401


def test_delete_removes_row_and_files(client, tokens, dataset, sm_volume):
    vid = sm_volume["id"]
    keep = upload(client, tokens, dataset["id"], CT, case_id="keep").json()
    assert stored_files(f"volumes/{vid}")
    client.get(f"/api/v1/volumes/{vid}/slices/3.png", headers=tokens.headers("annotator"))  # warm the cache
    response = client.delete(f"/api/v1/volumes/{vid}", headers=tokens.headers("researcher"))
    assert response.status_code == 204 and response.content == b""
    assert client.get(f"/api/v1/volumes/{vid}", headers=tokens.headers("admin")).status_code == 404
    assert client.get(f"/api/v1/volumes/{vid}/slices/3.png", headers=tokens.headers("admin")).status_code == 404
    assert stored_files(f"volumes/{vid}") == []
    assert stored_files() == sorted(f"volumes/{keep['id']}/{n}" for n in ("image.nii.gz", "canonical.npy"))
    assert client.delete(f"/api/v1/volumes/{vid}", headers=tokens.headers("researcher")).status_code == 404
    # The case id is free again.
    again = upload(client, tokens, dataset["id"], CT, case_id="sm")
    assert again.status_code == 201, again.text


def test_canonical_cache_holds_the_canonical_array(sm_volume):
    from app.core.storage import get_storage

    data = get_storage().read_bytes(f"volumes/{sm_volume['id']}/canonical.npy")
    cached = np.load(io.BytesIO(data))
    expected = np.asanyarray(nib.as_closest_canonical(nib.load(str(CT))).dataobj)
    assert cached.dtype == np.int16
    np.testing.assert_array_equal(cached, expected)
