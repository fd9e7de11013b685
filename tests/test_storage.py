"""Artefact store: validated keys, atomic writes, streaming; local, fsspec memory:// and S3 (a real S3 API:
moto's server, tests/s3.py) back ends."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.storage import Storage, StorageUnavailable
from tests.s3 import environ, s3_env

BUCKET = "crowdsam-storage-tests"


@pytest.fixture(autouse=True)
def clean_state() -> None:
    """No database or Redis here: skip conftest's per-test reset."""


@pytest.fixture
def s3() -> Iterator[dict[str, str]]:
    """The AWS variables of the session's moto server, set for the test; the bucket exists."""
    env = s3_env(BUCKET)
    with environ(env):
        yield env


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request, tmp_path) -> Storage:  # type: ignore[no-untyped-def]
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    if request.param == "s3":
        request.getfixturevalue("s3")
        return Storage(f"s3://{BUCKET}/test-{uuid.uuid4().hex}")
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


def test_clear_empties_the_store_only(storage):
    storage.write_bytes("volumes/1/a.bin", b"1")
    storage.write_bytes("exports/2/b.bin", b"2")
    storage.clear()
    assert not storage.exists("volumes/1/a.bin") and not storage.exists("exports/2/b.bin")
    assert storage.fs.find(storage.root) == []
    storage.write_bytes("volumes/1/a.bin", b"again")  # still usable
    assert storage.read_bytes("volumes/1/a.bin") == b"again"


def test_s3_check_names_a_missing_bucket_and_passes_for_an_existing_one(s3):
    Storage(f"s3://{BUCKET}/prefix").check()
    with pytest.raises(StorageUnavailable, match="bucket 'no-such-bucket' does not exist"):
        Storage("s3://no-such-bucket/prefix").check()
    assert "testing-secret" not in repr(Storage(f"s3://{BUCKET}/p", {"secret": "testing-secret"}))


def test_s3_two_clients_see_each_others_writes_and_deletes_at_once(s3):
    """Two hosts: separate s3fs clients, no listing cache — a write or delete is visible to the other at once."""
    url = f"s3://{BUCKET}/shared-{uuid.uuid4().hex}"
    a, b = Storage(url), Storage(url, {"skip_instance_cache": True})
    assert a.fs is not b.fs
    assert not b.exists("volumes/1/mask.nii.gz")
    b.delete_prefix("volumes/1")  # lists the (empty) prefix
    a.write_bytes("volumes/1/mask.nii.gz", b"mask")
    assert b.exists("volumes/1/mask.nii.gz") and b.read_bytes("volumes/1/mask.nii.gz") == b"mask"
    a.delete_prefix("volumes/1")
    assert not b.exists("volumes/1/mask.nii.gz")


STREAM_CHILD = """
import hashlib, json, sys, tracemalloc
from pathlib import Path
import app.core.storage as store
store.UPLOAD_PART, store.UPLOAD_CONCURRENCY = 5 * 2**20, 1  # S3's smallest part, one at a time
storage = store.Storage(sys.argv[1])
storage.check()
tracemalloc.start()
storage.put_file("big/object.bin", Path(sys.argv[2]))
put_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.reset_peak()
digest = hashlib.sha256()
with storage.open("big/object.bin") as fh:
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
print(json.dumps({"put_peak": put_peak, "read_peak": tracemalloc.get_traced_memory()[1],
                  "sha256": digest.hexdigest()}))
"""


def test_s3_large_object_is_streamed_not_held_in_memory(s3, tmp_path):
    """A 50 MiB put_file is a multipart upload (10 parts of 5 MiB) and a read is ranged: a process holds a few
    buffers, not the object. Measured in a child process (tracemalloc), apart from moto's server, which keeps
    objects in memory."""
    size = 50 * 2**20
    big = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with big.open("wb") as fh:
        for _ in range(size // 2**20):
            block = os.urandom(2**20)
            digest.update(block)
            fh.write(block)
    url = f"s3://{BUCKET}/big-{uuid.uuid4().hex}"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", STREAM_CHILD, url, str(big)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **s3})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["sha256"] == digest.hexdigest()
    assert out["put_peak"] < size * 0.4, out  # a whole-object PUT (s3fs's default up to 100 MiB) peaks >= 50 MiB
    assert out["read_peak"] < size * 0.4, out
    storage = Storage(url)  # this process sees the child's object whole
    info = storage.fs.info(f"{storage.root}/big/object.bin")
    assert info["size"] == size and info["ETag"].strip('"').endswith("-10")  # a 10-part multipart upload


def test_settings_storage_options_reach_fsspec_and_stay_out_of_reprs(s3, monkeypatch):
    from app.core.config import get_settings
    from app.core.storage import get_storage

    monkeypatch.setenv("CROWDSAM_STORAGE_URL", f"s3://{BUCKET}/opts-{uuid.uuid4().hex}")
    monkeypatch.setenv("CROWDSAM_STORAGE_OPTIONS", json.dumps({"key": s3["AWS_ACCESS_KEY_ID"],
                                                               "secret": s3["AWS_SECRET_ACCESS_KEY"]}))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # the credentials come from the options only
    get_settings.cache_clear()
    get_storage.cache_clear()
    try:
        storage = get_storage()
        storage.check()
        storage.write_bytes("a.json", b"{}")
        assert storage.read_bytes("a.json") == b"{}"
        assert s3["AWS_SECRET_ACCESS_KEY"] not in f"{get_settings()!r} {get_settings()} {storage!r}"
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        get_storage.cache_clear()


def test_mirror_is_a_local_copy_renewed_when_the_object_changes(storage, tmp_path):
    """Remote objects are memory-mapped from a per-host copy; a rewritten object gets a fresh copy."""
    import numpy as np

    storage.mirror_dir = tmp_path / "mirror"
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    source = tmp_path / "a.npy"
    np.save(source, array)
    storage.put_file("volumes/1/canonical.npy", source)
    first = storage.mirror("volumes/1/canonical.npy")
    assert np.array_equal(np.load(first, mmap_mode="r"), array)
    assert storage.mirror("volumes/1/canonical.npy") == first  # downloaded once
    np.save(source, array * 2)
    storage.put_file("volumes/1/canonical.npy", source)
    assert np.array_equal(np.load(storage.mirror("volumes/1/canonical.npy"), mmap_mode="r"), array * 2)
    if storage.is_local:
        assert not storage.mirror_dir.exists()  # a local store's object is its own mirror
    else:
        assert all(".tmp-" not in p.name for p in storage.mirror_dir.iterdir())
