"""Upload memory: a per-upload budget checked from the header, and a measured peak within the documented cost.

The cost of one upload (DESIGN §9 "Upload memory") is ``voxels × bytes per voxel + fixed_bytes()``, where bytes
per voxel is the stored voxel size of the file being decoded (a reference adds its label map's, 1 or 2):
only one decoded file is held at a time and everything else goes chunk by chunk. The regression tests
measure the peak with tracemalloc (numpy's buffers and nibabel's reads are traced) on chunk sizes made
small, so that one extra full-size copy anywhere in the path would exceed the bound.

The 503 for a further upload while the heavy gate is full is tested in tests/test_admission.py
(``test_heavy_requests_have_their_own_small_gate``, and ``upload_volume`` is marked heavy there).
"""

from __future__ import annotations

import gc
import gzip
import io
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import func, select

from tests.conftest import CT_DIR

CT = CT_DIR / "example_ct_sm.nii.gz"
SEG = CT_DIR / "example_seg.nii.gz"
AFFINE = np.diag([0.8, 0.8, 1.5, 1.0])
LPS = np.diag([-0.8, -0.8, 1.5, 1.0])
PERMUTED = np.array([[0, 0.8, 0, 0], [0, 0, 0.8, 0], [1.5, 0, 0, 0], [0, 0, 0, 1.0]])  # axes S, R, A


# --- helpers ----------------------------------------------------------------------------------------
def _claims(shape: tuple[int, int, int], dtype: Any, payload: int = 2048) -> bytes:
    """A gzipped NIfTI whose header claims ``shape``/``dtype`` but carries only ``payload`` bytes of data."""
    raw = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), AFFINE).to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header.set_data_shape(shape)
    buf = io.BytesIO()
    header.write_to(buf)
    head = buf.getvalue()
    return gzip.compress(head + raw[len(head): 352] + b"\0" * payload)


def _post(client, tokens, dataset_id: int, image: bytes, reference: bytes | None = None):  # type: ignore[no-untyped-def]
    files = {"image": ("ct.nii.gz", image, "application/gzip")}
    if reference is not None:
        files["reference"] = ("seg.nii.gz", reference, "application/gzip")
    return client.post(f"/api/v1/datasets/{dataset_id}/volumes", files=files, data={"case_id": "case1"},
                       headers=tokens.headers("researcher"))


def _stored_files() -> list[str]:
    from app.core.storage import get_storage

    root = Path(get_storage().root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _volume_rows() -> int:
    from app.core.db import session_scope
    from app.volumes.models import Volume

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Volume)) or 0)


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``budget(n)``: a fresh app whose per-upload memory budget is ``n`` bytes (settings restored after)."""
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.main import create_app

    clients: list[Any] = []

    def make(n: int) -> Any:
        monkeypatch.setenv("CROWDSAM_UPLOAD_MEMORY_BYTES", str(n))
        get_settings.cache_clear()
        assert get_settings().upload_memory_bytes == n
        client = TestClient(create_app())
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    monkeypatch.delenv("CROWDSAM_UPLOAD_MEMORY_BYTES")
    get_settings.cache_clear()


# --- the budget, checked from the header ---------------------------------------------------------------
def test_the_default_budget_refuses_a_header_over_it_before_decoding(client, tokens, dataset):
    """2048×2048×200 float32 is under CROWDSAM_MAX_VOXELS but needs 3.2 GB: refused from the header alone.

    Only 2 KB of data follow the header: had a voxel been read, the answer would say 'truncated'.
    """
    from app.core.config import get_settings

    assert get_settings().upload_memory_bytes == 2 * 1024**3
    assert get_settings().max_voxels > 2048 * 2048 * 200
    tracemalloc.start()
    try:
        response = _post(client, tokens, dataset["id"], _claims((2048, 2048, 200), np.float32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert "truncated" not in detail
    for needle in ("image:", "2048×2048×200 float32", "838860800 voxels × 4 bytes", "budget of 2048 MiB",
                   "CROWDSAM_UPLOAD_MEMORY_BYTES", "at most"):
        assert needle in detail, (needle, detail)
    assert peak < 64 * 2**20, f"refusing from the header allocated {peak} bytes"
    assert _volume_rows() == 0 and _stored_files() == []


@pytest.mark.parametrize(("dtype", "status"), [(np.uint8, 422), (np.int16, 422), (np.float32, 413)])
def test_the_voxel_limit_follows_the_stored_voxel_type(budget, tokens, dataset, dtype, status):
    """A budget of 48 MiB above the fixed cost: 2048×2048×5 voxels fit as uint8/int16 (then found truncated,
    2 KB of data), not as float32."""
    from app.volumes.service import fixed_bytes

    client = budget(fixed_bytes() + 48 * 2**20)
    response = _post(client, tokens, dataset["id"], _claims((2048, 2048, 5), dtype))
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert ("truncated" in detail) == (status == 422)
    if status == 413:
        assert f"at most {48 * 2**20 // 4} voxels of this type fit" in detail
    assert _volume_rows() == 0 and _stored_files() == []


def test_budget_setting_admits_exactly_what_fits(budget, tokens, dataset):
    """At the image's cost it uploads, one byte below it is 413; a reference costs its own (stored + labels)."""
    from app.imaging.nifti import read_header
    from app.volumes.service import image_bytes_per_voxel, upload_memory_bytes

    header = read_header(CT, "image", max_voxels=1 << 40, max_dim=4096)
    need = upload_memory_bytes(header, image_bytes_per_voxel(header))
    assert need == header.n_voxels * 2 + upload_memory_bytes(header, 0)  # int16: 2 bytes per voxel

    refused = _post(budget(need - 1), tokens, dataset["id"], CT.read_bytes())
    assert refused.status_code == 413, refused.text
    assert "image:" in refused.json()["detail"] and "CROWDSAM_UPLOAD_MEMORY_BYTES" in refused.json()["detail"]
    assert _volume_rows() == 0 and _stored_files() == []

    # the same voxels as an int32 reference: 4 stored + 1 label byte per voxel, more than the image's 2
    seg = np.asanyarray(nib.load(str(SEG)).dataobj)
    wide_ref = gzip.compress(nib.Nifti1Image(np.where(seg == 5, 5, 0).astype(np.int32), nib.load(str(CT)).affine)
                             .to_bytes(), compresslevel=1)
    refused = _post(budget(need), tokens, dataset["id"], CT.read_bytes(), wide_ref)
    assert refused.status_code == 413, refused.text
    assert refused.json()["detail"].startswith("reference:")
    assert f"{header.n_voxels} voxels × 5 bytes" in refused.json()["detail"]
    assert _volume_rows() == 0 and _stored_files() == []

    accepted = _post(budget(need + 3 * header.n_voxels), tokens, dataset["id"], CT.read_bytes(), wide_ref)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["reference_labels"] == ["liver"]


# --- the measured peak ---------------------------------------------------------------------------------
SHAPE = (256, 256, 128)  # 8.4 M voxels: one int16 copy (16 MiB) is well above the small-chunk fixed cost


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    ct = rng.integers(-1024, 1500, size=SHAPE, dtype=np.int16)
    seg = np.zeros(SHAPE, np.uint8)
    seg[40:120, 60:200, 10:100] = 5
    seg[150:230, 30:90, 20:60] = 1
    seg[0:4, 0:4, 0:4] = 77  # not a label: dropped with reference_other=background
    out = tmp_path_factory.mktemp("upload-memory")

    def save(name: str, data: np.ndarray, affine: np.ndarray, slope_inter: tuple[float, float] | None = None) -> None:
        img = nib.Nifti1Image(data, affine)
        if slope_inter is not None:
            img.header.set_slope_inter(*slope_inter)
        nib.save(img, str(out / name))

    save("ct_lps.nii.gz", ct, LPS)
    save("seg_lps.nii.gz", seg, LPS)
    save("ct_f32.nii.gz", ct.astype(np.float32) / 4, AFFINE)
    save("ct_scaled.nii.gz", np.transpose(ct, (2, 0, 1)), PERMUTED, (0.37, -1024.3))  # decodes to float64
    save("ct_ras.nii.gz", ct, AFFINE)
    save("seg_i16.nii.gz", seg.astype(np.int16) * (seg != 77), AFFINE)
    return {p.name: p for p in out.iterdir()}


@pytest.mark.parametrize(
    ("image", "reference"),
    [
        ("ct_lps.nii.gz", "seg_lps.nii.gz"),  # int16 LPS (flipped) + uint8 reference
        ("ct_f32.nii.gz", None),  # float32
        ("ct_scaled.nii.gz", None),  # int16 with scl_slope/scl_inter, axes S, R, A
        ("ct_ras.nii.gz", "seg_i16.nii.gz"),  # int16 reference: 2 + 1 bytes per voxel
    ],
)
def test_peak_memory_of_an_upload_is_within_the_documented_cost(monkeypatch, dataset, volumes, image, reference):
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.datasets.models import Dataset
    from app.imaging import nifti
    from app.volumes import service

    monkeypatch.setattr(nifti, "CHUNK_VOXELS", 1 << 16)
    monkeypatch.setattr(nifti, "READ_BYTES", 1 << 18)
    n = int(np.prod(SHAPE))
    image_header = nib.load(str(volumes[image])).header
    cost = n * image_header.get_data_dtype().itemsize  # the image's voxels as stored
    if reference is not None:  # the reference's voxels as stored + a uint8 label map (the labels are ≤ 255)
        cost = max(cost, n * (nib.load(str(volumes[reference])).header.get_data_dtype().itemsize + 1))
    bound = cost + service.fixed_bytes()
    assert service.fixed_bytes() < n  # one more byte per voxel anywhere would break the bound

    with session_scope() as session:
        ds = session.get(Dataset, dataset["id"])
        options = service.ReferenceOptions(other_to_background=True)
        gc.collect()
        tracemalloc.start()
        try:
            volume = service.upload_volume(
                session, get_storage(), ds, image=service.UploadedFile(volumes[image], image), case_id="mem",
                split="train", reference=service.UploadedFile(volumes[reference], reference) if reference else None,
                reference_options=options,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        session.commit()
        assert volume.canonical_shape == list(nib.as_closest_canonical(nib.load(str(volumes[image]))).shape)
        if reference is not None:
            assert volume.reference_labels == ["liver", "spleen"]
    assert n * image_header.get_data_dtype().itemsize <= peak, "the decode was not measured"
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > documented {bound / 2**20:.1f} MiB"


# --- the chunked paths write what the whole-array code wrote ---------------------------------------------
def _old_canonical_npy(path: Path) -> bytes:
    """The previous implementation: decode whole, reorient, cast, ``np.save``."""
    from app.imaging.coords import Orientation

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    data = data[..., 0] if data.ndim == 4 else data
    canonical = Orientation.from_affine(img.affine, data.shape).canonical(data)
    fits = canonical.dtype.kind in "iu" and canonical.min() >= -32768 and canonical.max() <= 32767
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(canonical.astype(np.int16 if fits else np.float32)))
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [1 << 20, 64, 9, 4])  # whole planes, rows of a plane, parts of a row
def test_canonical_cache_is_byte_identical_to_the_whole_array_save(monkeypatch, tmp_path, chunk):
    from app.imaging import nifti
    from app.imaging.coords import Orientation
    from app.volumes.service import write_canonical

    monkeypatch.setattr(nifti, "CHUNK_VOXELS", chunk)
    rng = np.random.default_rng(3)
    base = rng.integers(-1000, 1000, size=(7, 6, 5), dtype=np.int16)
    cases: list[tuple[np.ndarray, np.ndarray, tuple[float, float] | None, str]] = [
        (base, AFFINE, None, "i16.nii.gz"),
        (base, LPS, None, "i16.nii"),
        (np.transpose(base, (2, 0, 1)).astype(np.int32) * 100, PERMUTED, None, "i32_wide.nii.gz"),
        (base.astype(np.float32) / 3, LPS, None, "f32.nii.gz"),
        (np.transpose(base, (2, 0, 1)), PERMUTED, (0.37, -1024.3), "scaled.nii.gz"),
        (base.astype(np.uint8)[..., None], LPS, None, "u8_4d.nii.gz"),
    ]
    for data, affine, slope_inter, name in cases:
        img = nib.Nifti1Image(data, affine)
        if slope_inter is not None:
            img.header.set_slope_inter(*slope_inter)
        path = tmp_path / name
        nib.save(img, str(path))
        header = nifti.read_header(path, "image", max_voxels=1 << 40, max_dim=4096)
        out = tmp_path / f"{name}.npy"
        write_canonical(nifti.read_voxels(header), Orientation.from_affine(header.affine, header.shape), out)
        assert out.read_bytes() == _old_canonical_npy(path), name


def _old_remap(ref: np.ndarray, labels: dict[str, int], mapping: dict[int, str] | None,
               other: bool) -> tuple[np.ndarray, list[str]]:
    """The previous whole-array ``remap_reference`` (int32 output)."""
    from app.core.errors import Invalid

    if ref.dtype.kind == "f" and (not np.all(np.isfinite(ref)) or not np.all(ref == np.round(ref))):
        raise Invalid("reference: label map has non-integer values")
    if ref.dtype.kind in "iuf" and ref.size and ref.min() < 0:
        raise Invalid("reference: label map has negative values")
    values = [int(v) for v in np.unique(ref) if v != 0]
    ints = ref.astype(np.int64)
    source_to_target = ({v: labels[name] for v, name in mapping.items()} if mapping is not None
                        else {v: v for v in labels.values()})
    unknown = [v for v in values if v not in source_to_target]
    if unknown and not other:
        hint = " (send reference_map and reference_other=background to keep only mapped structures)"
        raise Invalid(f"reference: values {unknown[:50]} are not labels of this dataset{hint}")
    out = np.zeros(ints.shape, dtype=np.int32)
    for source, target in source_to_target.items():
        out[ints == source] = target
    by_value = {v: k for k, v in labels.items()}
    return out, sorted(by_value[int(v)] for v in np.unique(out) if v != 0)


def _remap_cases() -> dict[str, tuple[np.ndarray, dict[str, int], dict[int, str] | None, bool]]:
    rng = np.random.default_rng(5)
    labels = {"spleen": 1, "kidney": 2, "liver": 5}
    u8 = rng.choice(np.array([0, 0, 0, 1, 2, 5], np.uint8), size=(6, 5, 4))
    junk = u8.copy()
    junk.flat[::2] = np.arange(junk.size // 2) % 120 + 100  # 60+ unknown values spread over every chunk
    neg_then_fraction = u8.astype(np.float32)
    neg_then_fraction.flat[3] = -1  # in the first chunk
    neg_then_fraction.flat[-2] = 1.5  # in the last: non-integer wins, as before
    wide = np.where(u8 == 5, 300, u8).astype(np.uint16)
    return {
        "uint8-known": (u8, labels, None, False),
        "uint8-unknown-listed": (junk, labels, None, False),
        "uint8-unknown-dropped": (junk, labels, None, True),
        "mapped": (junk, labels, {100: "liver", 101: "liver", 2: "spleen"}, True),
        "float-integral": (u8.astype(np.float64), labels, None, False),
        "negative": (u8.astype(np.int16) - 1, labels, None, False),
        "non-integer-beats-negative": (neg_then_fraction, labels, None, False),
        "labels-above-255": (wide, {"spleen": 1, "kidney": 2, "liver": 300}, None, False),
        "nothing-present": (np.zeros((6, 5, 4), np.uint8), labels, None, False),
    }


@pytest.mark.parametrize("name", sorted(_remap_cases()))
def test_chunked_reference_remap_matches_the_whole_array_remap(monkeypatch, tmp_path, name):
    from app.core.errors import Invalid
    from app.imaging import nifti
    from app.volumes.service import ReferenceOptions, remap_reference

    monkeypatch.setattr(nifti, "CHUNK_VOXELS", 7)
    ref, labels, mapping, other = _remap_cases()[name]
    path = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(ref, AFFINE), str(path))
    voxels = nifti.read_voxels(nifti.read_header(path, "reference", max_voxels=1 << 40, max_dim=4096))
    decoded = np.asanyarray(nib.load(str(path)).dataobj)
    dataset = SimpleNamespace(labels=labels)
    options = ReferenceOptions(mapping=mapping, other_to_background=other)
    try:
        expected: tuple[np.ndarray, list[str]] | str = _old_remap(decoded, labels, mapping, other)
    except Invalid as exc:
        expected = str(exc.detail)
    try:
        got: tuple[np.ndarray, list[str]] | str = remap_reference(voxels, dataset, options)  # type: ignore[arg-type]
    except Invalid as exc:
        got = str(exc.detail)
    if isinstance(expected, str):
        assert got == expected
        return
    assert not isinstance(got, str), got
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[0].dtype == nifti.label_dtype(int(expected[0].max(initial=0)))
    assert got[1] == expected[1]


def test_load_nifti_still_decodes_whole_and_scaled(tmp_path):
    """Evaluations read predictions with ``load_nifti``: the same array as ``np.asanyarray(img.dataobj)``."""
    from app.imaging.nifti import load_nifti

    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3), LPS)
    img.header.set_slope_inter(2.0, 1.0)
    path = tmp_path / "pred.nii.gz"
    nib.save(img, str(path))
    loaded = load_nifti(path, "prediction", max_voxels=1000, max_dim=10)
    expected = np.asanyarray(nib.load(str(path)).dataobj)
    assert loaded.data.dtype == expected.dtype
    np.testing.assert_array_equal(loaded.data, expected)
    assert json.dumps(loaded.affine.tolist()) == json.dumps(np.asarray(nib.load(str(path)).affine).tolist())
