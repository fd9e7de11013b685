"""Prediction archives (evaluation uploads): bounded cost and a clear 4xx for every malformed archive.

Unit tests drive :func:`app.evaluations.archive.unpack` with small budgets; the corpus test posts each
malformed archive to the API and checks that it answers 4xx with a JSON message and stores nothing.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from app.core.errors import Invalid, PayloadTooLarge
from app.evaluations.archive import MAX_MEMBERS, unpack
from tests.conftest import CT_DIR
from tests.helpers_exporteval import reference_array, upload_case

NIFTI = gzip.compress(b"\x00" * 1000)  # content does not matter to unpack


def tar_gz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # a symlink, as Info-ZIP stores one
            zf.writestr(info, target)
    return buffer.getvalue()


def _unpack(tmp_path: Path, data: bytes, max_bytes: int = 10_000_000) -> Any:
    archive = tmp_path / "in.archive"
    archive.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return unpack(archive, out, max_bytes=max_bytes)


def test_tar_skipped_members_count_against_the_decompressed_cap(tmp_path):
    """A 50 MB skipped member (50 KB compressed) is decompressed by any tar reader: it counts, 413 past the cap."""
    bomb = tar_gz({"plans.json": b"\x00" * 50_000_000, "sm.nii.gz": NIFTI})
    assert len(bomb) < 100_000
    started = time.process_time()
    with pytest.raises(PayloadTooLarge, match="exceeds 1000000 bytes"):
        _unpack(tmp_path, bomb, max_bytes=1_000_000)
    assert time.process_time() - started < 0.5  # stopped at the cap, not after 50 MB
    assert _unpack(tmp_path, bomb, max_bytes=60_000_000).skipped == ["plans.json"]


def test_zip_skipped_members_are_never_decompressed(tmp_path):
    bomb = zip_of({"plans.json": b"\x00" * 50_000_000, "sm.nii.gz": NIFTI})
    unpacked = _unpack(tmp_path, bomb, max_bytes=1_000_000)  # the skipped 50 MB never count
    assert unpacked.skipped == ["plans.json"] and list(unpacked.files) == ["sm"]
    taken_bomb = zip_of({"sm.nii": b"\x00" * 5_000_000})
    with pytest.raises(PayloadTooLarge, match="exceeds 1000000 bytes"):
        _unpack(tmp_path, taken_bomb, max_bytes=1_000_000)


def _lying_zip() -> bytes:
    """A zip whose member claims 10 bytes but inflates to 5 MB: read no further than it claims, then a CRC error."""
    data = bytearray(zip_of({"sm.nii": b"\x00" * 5_000_000}))
    for offset in (data.find(b"PK\x03\x04") + 22, data.find(b"PK\x01\x02") + 24):  # uncompressed size fields
        data[offset: offset + 4] = (10).to_bytes(4, "little")
    return bytes(data)


def _truncated_tar_gz() -> bytes:
    data = tar_gz({"sm.nii.gz": NIFTI * 50, "plans.json": b"{}" * 1000})
    return data[: len(data) // 2]


def _corrupt_zip() -> bytes:
    data = bytearray(zip_of({"sm.nii.gz": bytes(range(256)) * 400}))
    start = data.find(b"sm.nii.gz") + len("sm.nii.gz")
    data[start: start + 200] = b"\xff" * 200  # the member's deflate stream
    return bytes(data)


MALFORMED: dict[str, tuple[bytes, int, str]] = {
    "not an archive": (b"just some text, not an archive at all" * 20, 422, "not a zip or tar"),
    "empty file": (b"", 422, "not a zip or tar"),
    "a bare nii.gz": (gzip.compress(b"\x5c\x01" + b"\x00" * 2000), 422, "not a zip or tar"),
    "bad gzip": (b"\x1f\x8b\x08\x00" + b"\x13" * 500, 422, "truncated or corrupt"),
    "truncated tar.gz": (_truncated_tar_gz(), 422, "truncated or corrupt"),
    "corrupt zip member": (_corrupt_zip(), 422, "truncated or corrupt"),
    "zip without central directory": (zip_of({"sm.nii.gz": NIFTI})[:-30], 422, "not a zip or tar"),
    "symlinks only (tar)": (tar_gz({}, links={"sm.nii.gz": "/etc/passwd"}), 422, "no {CASE}.nii.gz"),
    "symlinks only (zip)": (zip_of({}, links={"sm.nii.gz": "/etc/passwd"}), 422, "no {CASE}.nii.gz"),
    "two files for one case": (zip_of({"a/sm.nii.gz": NIFTI, "b/sm.nii.gz": NIFTI}), 422, "more than one file"),
    "too many members (zip)": (zip_of({f"f{i}.txt": b"" for i in range(MAX_MEMBERS + 1)}), 422, "more than"),
    "zip bomb": (zip_of({"sm.nii": b"\x00" * 5_000_000}), 413, "exceeds"),
    "zip bomb, lying sizes": (_lying_zip(), 422, "Bad CRC-32"),
    "tar.gz bomb in a skipped member": (tar_gz({"a.bin": b"\x00" * 5_000_000, "sm.nii.gz": NIFTI}), 413, "exceeds"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_archives_are_refused_by_unpack(tmp_path, case):
    data, status, message = MALFORMED[case]
    with pytest.raises((Invalid, PayloadTooLarge)) as caught:
        _unpack(tmp_path, data, max_bytes=1_000_000)
    assert caught.value.status_code == status and message in str(caught.value.detail), caught.value.detail


def test_tar_member_count_is_capped(tmp_path):
    data = tar_gz({f"f{i}.txt": b"" for i in range(MAX_MEMBERS + 1)})
    with pytest.raises(Invalid, match=f"more than {MAX_MEMBERS} files"):
        _unpack(tmp_path, data, max_bytes=100_000_000)


def test_paths_are_flattened_and_links_skipped(tmp_path):
    data = tar_gz({"../../x/sm.nii.gz": NIFTI, "/abs/other.nii": b"x"}, links={"link.nii.gz": "../sm.nii.gz"})
    unpacked = _unpack(tmp_path, data)
    assert sorted(unpacked.files) == ["other", "sm"] and unpacked.skipped == ["link.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other.nii", "sm.nii.gz"]


# --- through the API ----------------------------------------------------------------------------
CAP = 2_000_000  # CROWDSAM_MAX_UPLOAD_BYTES of this test: bodies fit, bombs do not unpack


@pytest.fixture
def capped_client(monkeypatch) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("CROWDSAM_MAX_UPLOAD_BYTES", str(CAP))
    get_settings.cache_clear()
    with TestClient(create_app()) as test_client:
        yield test_client
    monkeypatch.delenv("CROWDSAM_MAX_UPLOAD_BYTES")
    get_settings.cache_clear()


def _nothing_stored() -> None:
    from sqlalchemy import func, select

    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.evaluations.models import Evaluation

    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 0
    assert not (Path(get_storage().root) / "evaluations").exists() or not any(
        (Path(get_storage().root) / "evaluations").rglob("*"))


def test_malformed_prediction_archives_answer_4xx_and_store_nothing(capped_client, tokens, monkeypatch, tmp_path):
    from app.core.config import get_settings

    client = capped_client
    response = client.post("/api/v1/datasets", json={"name": "d", "labels": {"spleen": 1, "kidney_right": 2,
                           "kidney_left": 3, "liver": 5, "aorta": 52}}, headers=tokens.headers("researcher"))
    assert response.status_code == 201, response.text
    did = response.json()["id"]
    volume = upload_case(client, tokens, did, "sm", CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz")
    ref, img = reference_array(volume["id"])
    path = tmp_path / "pred.nii.gz"
    nib.save(nib.Nifti1Image(ref.astype(np.uint8), img.affine, img.header), str(path))
    good = path.read_bytes()
    truncated_nifti = good[: len(good) // 2]  # a sound header, truncated voxels

    corpus = {**MALFORMED,
              "truncated prediction": (zip_of({"sm.nii.gz": truncated_nifti}), 422, "truncated or corrupt")}
    for case, (data, status, message) in corpus.items():
        response = client.post(f"/api/v1/datasets/{did}/evaluations", files={"predictions": ("p.tar.gz", data)},
                               headers=tokens.headers("researcher"))
        assert response.status_code == status, (case, response.text)
        assert message in json.dumps(response.json()["detail"]), (case, response.json())
        _nothing_stored()

    # the per-upload memory budget, from the header before a voxel is decoded: stored voxels + the label map
    from app.volumes.service import fixed_bytes

    need = int(np.prod(ref.shape)) * 2 + fixed_bytes()
    monkeypatch.setenv("CROWDSAM_UPLOAD_MEMORY_BYTES", str(need - 1))
    get_settings.cache_clear()
    response = client.post(f"/api/v1/datasets/{did}/evaluations", files={"predictions": ("p.zip", zip_of(
        {"sm.nii.gz": good}))}, headers=tokens.headers("researcher"))
    assert response.status_code == 413 and "CROWDSAM_UPLOAD_MEMORY_BYTES" in response.json()["detail"], response.text
    _nothing_stored()
    monkeypatch.setenv("CROWDSAM_UPLOAD_MEMORY_BYTES", str(need))
    get_settings.cache_clear()
    response = client.post(f"/api/v1/datasets/{did}/evaluations", files={"predictions": ("p.zip", zip_of(
        {"sm.nii.gz": good}))}, headers=tokens.headers("researcher"))
    assert response.status_code == 202, response.text
