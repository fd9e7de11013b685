"""Artefact store: validated keys, atomic writes, local and non-local (fsspec memory://) back ends."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.core.storage import Storage


@pytest.fixture(autouse=True)
def clean_state() -> None:
    """No database or Redis here: skip conftest's per-test reset."""


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path) -> Storage:  # type: ignore[no-untyped-def]
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    return Storage(f"memory://crowdsam-test-{uuid.uuid4().hex}")


@pytest.mark.parametrize("key", ["", ".", "../x", "a/../../x", "/etc/passwd", "a\\b", "./..", "a/../.."])
def test_invalid_keys_are_refused(storage, key):
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.exists(key)
    with pytest.raises(ValueError):
        storage.write_bytes(key, b"x")


def test_write_read_exists_size(storage):
    assert not storage.exists("volumes/1/image.nii.gz")
    storage.write_bytes("volumes/1/image.nii.gz", b"abc" * 1000)
    assert storage.exists("volumes/1/image.nii.gz")
    assert storage.size("volumes/1/image.nii.gz") == 3000
    assert storage.read_bytes("volumes/1/image.nii.gz") == b"abc" * 1000
    with storage.open("volumes/1/image.nii.gz") as fh:
        assert fh.read(3) == b"abc"


def test_put_file_overwrites_atomically_and_leaves_no_temp_files(storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"first")
    storage.put_file("a/b.bin", src)
    src.write_bytes(b"second version")
    storage.put_file("a/b.bin", src)
    assert storage.read_bytes("a/b.bin") == b"second version"
    assert [Path(p).name for p in storage.fs.find(storage.root)] == ["b.bin"]


def test_failed_copy_leaves_nothing(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError):
        storage.put_file("x/y.bin", tmp_path / "missing.bin")
    assert not storage.exists("x/y.bin")
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def test_local_copy(storage):
    storage.write_bytes("v/1/image.nii.gz", b"payload")
    with storage.local_copy("v/1/image.nii.gz") as path:
        assert path.exists() and path.read_bytes() == b"payload"
        assert path.name.endswith(".nii.gz")
        local = path
    if not storage.is_local:
        assert not local.exists()  # the download was temporary


def test_delete_prefix(storage):
    storage.write_bytes("volumes/1/a.bin", b"1")
    storage.write_bytes("volumes/1/sub/b.bin", b"2")
    storage.write_bytes("volumes/12/a.bin", b"3")
    storage.delete_prefix("volumes/1")
    assert not storage.exists("volumes/1/a.bin") and not storage.exists("volumes/1/sub/b.bin")
    assert storage.read_bytes("volumes/12/a.bin") == b"3"
    storage.delete_prefix("volumes/404")  # missing prefix: no error


def test_settings_storage_url_selects_the_backend(monkeypatch, tmp_path):
    from app.core.config import get_settings

    monkeypatch.setenv("CROWDSAM_STORAGE_URL", "memory://configured")
    get_settings.cache_clear()
    try:
        assert get_settings().store_url == "memory://configured"
        assert not Storage(get_settings().store_url).is_local
    finally:
        monkeypatch.delenv("CROWDSAM_STORAGE_URL")
        get_settings.cache_clear()
    assert get_settings().store_url.endswith("/store")
