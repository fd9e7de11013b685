"""Malformed uploads: every one is a 4xx whose JSON detail names the problem, and nothing is stored.

The corpus is built here from the real sample CT (``example_ct_sm``) and its reference map with
nibabel/numpy; headers are patched byte-for-byte where nibabel refuses to write the broken file.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import func, select

from tests.conftest import CT_DIR, TOTALSEG_MAP

CT = CT_DIR / "example_ct_sm.nii.gz"
SEG = CT_DIR / "example_seg.nii.gz"
KNOWN_VALUES = {1, 2, 3, 5, 52}  # the ``dataset`` fixture's label values


# --- building blocks ------------------------------------------------------------------------
@cache
def _ct() -> nib.Nifti1Image:
    return nib.load(str(CT))


@cache
def _ct_raw() -> bytes:
    """The uncompressed single-file NIfTI bytes of the sample CT."""
    return gzip.decompress(CT.read_bytes())


@cache
def _seg_data() -> np.ndarray:
    return np.asanyarray(nib.load(str(SEG)).dataobj)


def _patched(**fields: Any) -> bytes:
    """The sample CT with header fields overwritten (uncompressed bytes)."""
    raw = _ct_raw()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    for name, value in fields.items():
        header[name] = value
    buf = io.BytesIO()
    header.write_to(buf)
    return buf.getvalue() + raw[len(buf.getvalue()):]


def _nifti(data: np.ndarray, affine: np.ndarray | None = None, dtype: Any = None) -> bytes:
    """A gzipped single-file NIfTI of ``data`` (on the sample CT's affine unless given)."""
    img = nib.Nifti1Image(data, _ct().affine if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _ct_like(dtype: Any = np.int16) -> np.ndarray:
    return np.asanyarray(_ct().dataobj).astype(dtype)


def _seg_like(data: np.ndarray) -> bytes:
    return _nifti(data, dtype=data.dtype)


def _unknown_values() -> list[int]:
    return sorted(int(v) for v in np.unique(_seg_data()) if v != 0 and int(v) not in KNOWN_VALUES)


def _non_integer_reference() -> bytes:
    data = _seg_data().astype(np.float32)
    data[data == 1] = 1.5
    return _seg_like(data)


def _other_affine_reference() -> bytes:
    affine = _ct().affine.copy()
    affine[:3, 3] += 5.0  # shifted by 5 mm
    return _nifti(_seg_data(), affine, np.uint8)


def _rgb_image() -> bytes:
    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return _nifti(rgb)


def _bomb() -> bytes:
    """Header claims 3000³ int16 voxels (54 GB); the payload is 2 KB."""
    return gzip.compress(_patched(dim=[3, 3000, 3000, 3000, 1, 1, 1, 1])[:2048])


def _huge_dim() -> bytes:
    return gzip.compress(_patched(dim=[3, 30000, 10, 10, 1, 1, 1, 1])[:2048])


def _singular_affine() -> bytes:
    srow_z = np.asarray(nib.Nifti1Header.from_fileobj(io.BytesIO(_ct_raw()))["srow_z"]).copy()
    srow_z[:3] = 0.0
    return gzip.compress(_patched(srow_z=srow_z, qform_code=0, sform_code=1), compresslevel=1)


def _non_finite_affine() -> bytes:
    return gzip.compress(_patched(srow_x=[np.inf, 0, 0, 0], qform_code=0, sform_code=1), compresslevel=1)


def _nan_voxels() -> bytes:
    data = _ct_like(dtype=np.float32)
    data[5, 5, 5] = np.nan
    return _nifti(data, dtype=np.float32)


@dataclass
class Case:
    """One malformed upload and what the answer must say."""

    image: Callable[[], bytes]
    status: int
    detail: tuple[str, ...]  # substrings the JSON detail must contain (case-insensitive)
    image_name: str = "ct.nii.gz"
    reference: Callable[[], bytes] | None = None
    reference_name: str = "seg.nii.gz"
    form: dict[str, str] = field(default_factory=dict)


def _ct_bytes() -> bytes:
    return CT.read_bytes()


def _seg_bytes() -> bytes:
    return SEG.read_bytes()


CASES: dict[str, Case] = {
    "not-gzip-not-nifti": Case(lambda: b"this is a text file, not a CT volume\n" * 20, 422, ("not a nifti",)),
    "gzip-but-not-nifti": Case(lambda: gzip.compress(b"hello " * 200), 422, ("not a nifti",)),
    "empty-file": Case(lambda: b"", 422, ("too short",)),
    "header-only-cut-gzip": Case(lambda: _ct_bytes()[:60], 422, ("not a readable gzip",)),
    "truncated-nii-gz": Case(lambda: _ct_bytes()[: len(_ct_bytes()) // 2], 422, ("truncated",)),
    "truncated-nii": Case(lambda: _ct_raw()[: len(_ct_raw()) // 2], 422, ("truncated",), image_name="ct.nii"),
    "2d": Case(lambda: _nifti(_ct_like()[:, :, 0]), 422, ("2d", "3d volume is required")),
    "4d-two-frames": Case(
        lambda: _nifti(np.stack([_ct_like(), _ct_like()], axis=-1)), 422, ("4d", "one frame")
    ),
    "5d": Case(lambda: _nifti(_ct_like()[..., None, None]), 422, ("5d",)),
    "zero-sized-dim": Case(lambda: gzip.compress(_patched(dim=[3, 122, 0, 30, 1, 1, 1, 1])), 422, ("zero-sized",)),
    "decompression-bomb": Case(_bomb, 422, ("27000000000 voxels exceed the limit",)),
    "absurd-dim": Case(_huge_dim, 422, ("dimension above the limit",)),
    "non-finite-affine": Case(_non_finite_affine, 422, ("non-finite",)),
    "singular-affine": Case(_singular_affine, 422, ("singular",)),
    "complex-dtype": Case(lambda: _nifti(_ct_like().astype(np.complex64)), 422, ("complex64", "not a real numeric")),
    "rgb-dtype": Case(_rgb_image, 422, ("not a real numeric",)),
    "nan-voxels": Case(_nan_voxels, 422, ("nan",)),
    "unknown-datatype-code": Case(lambda: gzip.compress(_patched(datatype=1234)), 422, ("cannot parse nifti header",)),
    "wrong-extension": Case(_ct_bytes, 422, (".nii", "ct.png"), image_name="ct.png"),
    "case-id-path-traversal": Case(_ct_bytes, 422, ("case_id", "../x"), form={"case_id": "../x"}),
    "case-id-slash": Case(_ct_bytes, 422, ("case_id",), form={"case_id": "a/b"}),
    "bad-split": Case(_ct_bytes, 422, ("split",), form={"split": "validation"}),
    "reference-other-shape": Case(
        _ct_bytes, 422, ("reference", "shape"), reference=lambda: _seg_like(_seg_data()[:, :, :20])
    ),
    "reference-other-affine": Case(_ct_bytes, 422, ("reference", "affine"), reference=_other_affine_reference),
    "reference-non-integer": Case(_ct_bytes, 422, ("reference", "non-integer"), reference=_non_integer_reference),
    "reference-negative": Case(
        _ct_bytes, 422, ("reference", "negative"), reference=lambda: _seg_like(_seg_data().astype(np.int16) - 1)
    ),
    "reference-unknown-values": Case(_ct_bytes, 422, ("reference", "not labels of this dataset"), reference=_seg_bytes),
    "reference-wrong-extension": Case(_ct_bytes, 422, ("reference", "seg.txt"), reference=_seg_bytes,
                                      reference_name="seg.txt"),
    "reference-not-nifti": Case(_ct_bytes, 422, ("reference", "not a nifti"), reference=lambda: b"x" * 400),
    "reference-map-bad-json": Case(
        _ct_bytes, 422, ("reference_map", "not valid json"), reference=_seg_bytes, form={"reference_map": "{1: spleen"}
    ),
    "reference-map-unknown-label": Case(
        _ct_bytes, 422, ("reference_map", "pancreas"), reference=_seg_bytes,
        form={"reference_map": json.dumps({"1": "spleen", "7": "pancreas"})},
    ),
    "reference-map-bad-key": Case(
        _ct_bytes, 422, ("reference_map", "positive integer"), reference=_seg_bytes,
        form={"reference_map": json.dumps({"zero": "spleen"})},
    ),
    "reference-map-not-object": Case(
        _ct_bytes, 422, ("reference_map", "json object"), reference=_seg_bytes, form={"reference_map": "[1, 2]"}
    ),
    "reference-map-without-reference": Case(
        _ct_bytes, 422, ("without a reference",), form={"reference_map": json.dumps(TOTALSEG_MAP)}
    ),
    "reference-other-bad-value": Case(
        _ct_bytes, 422, ("reference_other",), reference=_seg_bytes,
        form={"reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "drop"},
    ),
}


# --- helpers ----------------------------------------------------------------------------------
def stored_files() -> list[str]:
    from app.core.storage import get_storage

    root = Path(get_storage().root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def volume_rows() -> int:
    from app.core.db import session_scope
    from app.volumes.models import Volume

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Volume)) or 0)


def post_upload(client, tokens, dataset_id: int, case: Case):  # type: ignore[no-untyped-def]
    files = {"image": (case.image_name, case.image(), "application/octet-stream")}
    if case.reference is not None:
        files["reference"] = (case.reference_name, case.reference(), "application/octet-stream")
    data = {"case_id": "case1", **case.form}
    return client.post(
        f"/api/v1/datasets/{dataset_id}/volumes", files=files, data=data, headers=tokens.headers("researcher")
    )


def assert_refused(response, status: int, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    text = (detail if isinstance(detail, str) else json.dumps(detail)).lower()
    for needle in needles:
        assert needle.lower() in text, f"{needle!r} not in detail {detail!r}"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 14


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_upload_is_refused_and_nothing_is_stored(client, tokens, dataset, name):
    case = CASES[name]
    response = post_upload(client, tokens, dataset["id"], case)
    assert_refused(response, case.status, *case.detail)
    assert volume_rows() == 0
    assert stored_files() == []


def test_bomb_is_refused_from_the_header_alone(client, tokens, dataset):
    """The payload is cut after 2 KB: had the data been read, the answer would say 'truncated'."""
    response = post_upload(client, tokens, dataset["id"], CASES["decompression-bomb"])
    assert_refused(response, 422, "exceed the limit")
    assert "truncated" not in response.text


def test_unknown_reference_values_are_listed(client, tokens, dataset):
    response = post_upload(client, tokens, dataset["id"], CASES["reference-unknown-values"])
    assert_refused(response, 422, "reference_map")
    detail = response.json()["detail"]
    listed = [int(v) for v in detail[detail.index("[") + 1: detail.index("]")].split(",")]
    assert listed == _unknown_values()
    assert not KNOWN_VALUES & set(listed)
    assert volume_rows() == 0 and stored_files() == []


def test_singleton_fourth_axis_is_accepted(client, tokens, dataset):
    image = _nifti(_ct_like()[..., None])
    response = client.post(
        f"/api/v1/datasets/{dataset['id']}/volumes",
        files={"image": ("ct4d.nii.gz", image, "application/gzip")},
        data={"case_id": "ct4d"},
        headers=tokens.headers("researcher"),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["shape"] == [122, 101, 30]
    assert body["n_slices"] == 30
    assert volume_rows() == 1


def test_duplicate_case_id_is_409_and_stores_nothing_new(client, tokens, dataset, sm_volume):
    before = stored_files()
    assert before and all(f.startswith(f"volumes/{sm_volume['id']}/") for f in before)
    response = post_upload(client, tokens, dataset["id"], Case(_ct_bytes, 409, (), form={"case_id": "sm"}))
    assert_refused(response, 409, "case_id", "'sm'", "already exists")
    assert volume_rows() == 1
    assert stored_files() == before


def test_same_case_id_in_another_dataset_is_fine(client, tokens, dataset, sm_volume):
    other = client.post(
        "/api/v1/datasets", json={"name": "other", "labels": {"liver": 1}}, headers=tokens.headers("researcher")
    ).json()
    response = post_upload(client, tokens, other["id"], Case(_ct_bytes, 201, (), form={"case_id": "sm"}))
    assert response.status_code == 201, response.text


def test_upload_to_missing_dataset_is_404(client, tokens):
    response = post_upload(client, tokens, 999, Case(_ct_bytes, 404, ()))
    assert_refused(response, 404, "dataset 999")
    assert volume_rows() == 0 and stored_files() == []


def test_missing_image_field_is_422(client, tokens, dataset):
    response = client.post(
        f"/api/v1/datasets/{dataset['id']}/volumes", data={"case_id": "x"}, headers=tokens.headers("researcher")
    )
    assert_refused(response, 422, "image")
    assert volume_rows() == 0 and stored_files() == []


# --- size limit -------------------------------------------------------------------------------
LIMIT = 200_000  # bytes; the sample CT is ~480 KB


@pytest.fixture
def small_limit(monkeypatch) -> Iterator[None]:
    """Rebuild settings with a small upload limit (and restore the cached settings afterwards)."""
    from app.core.config import get_settings

    monkeypatch.setenv("CROWDSAM_MAX_UPLOAD_BYTES", str(LIMIT))
    get_settings.cache_clear()
    assert get_settings().max_upload_bytes == LIMIT
    yield
    monkeypatch.delenv("CROWDSAM_MAX_UPLOAD_BYTES")
    get_settings.cache_clear()


@pytest.fixture
def small_client(small_limit) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def _multipart(image: bytes, case_id: str = "big") -> tuple[bytes, str]:
    boundary = "crowdsamtestboundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"case_id\"\r\n\r\n{case_id}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.nii.gz\"\r\n"
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_upload_above_limit_with_content_length_is_413(small_client, tokens, dataset):
    response = small_client.post(
        f"/api/v1/datasets/{dataset['id']}/volumes",
        files={"image": ("big.nii.gz", CT.read_bytes(), "application/gzip")},
        data={"case_id": "big"},
        headers=tokens.headers("researcher"),
    )
    assert_refused(response, 413, f"limit of {LIMIT} bytes")
    assert volume_rows() == 0 and stored_files() == []


def test_upload_above_limit_chunked_is_413(small_client, tokens, dataset):
    body, content_type = _multipart(CT.read_bytes())

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i: i + 64 * 1024]

    response = small_client.post(
        f"/api/v1/datasets/{dataset['id']}/volumes",
        content=chunks(),
        headers={**tokens.headers("researcher"), "Content-Type": content_type},
    )
    assert_refused(response, 413, f"limit of {LIMIT} bytes")
    assert volume_rows() == 0 and stored_files() == []


def test_upload_limit_stops_reading_the_stream(small_limit, tokens, dataset):
    """Drive the ASGI app with an endless chunked body: it answers 413 after reading ~LIMIT bytes."""
    from app.main import create_app

    app = create_app()
    chunk = 64 * 1024
    head, content_type = _multipart(b"")
    head = head[: head.rindex(b"\r\n--")]  # open image part, never closed
    received = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        body = head if received == 0 else os.urandom(chunk)
        received += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    path = f"/api/v1/datasets/{dataset['id']}/volumes"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked"),
                    (b"authorization", tokens.headers("researcher")["Authorization"].encode())],
        "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert start["status"] == 413
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    assert f"limit of {LIMIT} bytes" in json.loads(body)["detail"]
    assert received <= LIMIT + 2 * chunk, f"read {received} bytes of an endless body"
    assert volume_rows() == 0 and stored_files() == []


def test_voxel_limit_is_configurable(monkeypatch, tokens, dataset):
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("CROWDSAM_MAX_VOXELS", "100000")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as small:
            response = post_upload(small, tokens, dataset["id"], Case(_ct_bytes, 422, ()))
    finally:
        monkeypatch.delenv("CROWDSAM_MAX_VOXELS")
        get_settings.cache_clear()
    assert_refused(response, 422, "369660 voxels exceed the limit of 100000")
    assert volume_rows() == 0 and stored_files() == []


def test_concurrent_duplicate_case_id_is_conflict_and_stores_nothing(dataset):
    """Two uploads of one case_id race past the existence check: the loser gets 409, not a 500."""
    import threading
    import time

    from app.core.db import session_scope
    from app.core.errors import Conflict
    from app.core.storage import get_storage
    from app.datasets.models import Dataset
    from app.volumes import service

    def upload_in(session) -> object:  # type: ignore[no-untyped-def]
        return service.upload_volume(
            session, get_storage(), session.get(Dataset, dataset["id"]),
            image=service.UploadedFile(CT, "ct.nii.gz"), case_id="race", split="train",
            reference=None, reference_options=service.ReferenceOptions(),
        )

    first, second = session_scope(), session_scope()
    outcome: dict[str, BaseException | None] = {}

    def run_second() -> None:
        try:
            upload_in(second)
            outcome["error"] = None
        except BaseException as exc:
            outcome["error"] = exc
            second.rollback()

    try:
        winner = upload_in(first)  # flushed, not committed: invisible to the second session
        thread = threading.Thread(target=run_second)
        thread.start()
        time.sleep(0.5)  # the second insert now waits on the unique index
        first.commit()
        thread.join(30)
        assert isinstance(outcome["error"], Conflict), outcome
        assert "race" in outcome["error"].detail
        assert volume_rows() == 1
        assert all(f.startswith(f"volumes/{winner.id}/") for f in stored_files())  # type: ignore[attr-defined]
    finally:
        first.close()
        second.close()
