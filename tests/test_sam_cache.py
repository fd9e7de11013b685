"""Embedding/decode cache: memory LRU bound, atomic disk entries, disk bound evicts the least recently used."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from workers.sam.cache import ArrayCache, make_key

MIB = 1024**2


def _record(value: float, n: int = 1000) -> dict[str, np.ndarray]:
    return {"embedding": np.full(n, value, dtype=np.float32)}


def test_make_key_is_stable_and_sensitive() -> None:
    assert make_key(a=1, b="x") == make_key(b="x", a=1)
    assert make_key(a=1, b="x") != make_key(a=2, b="x")


def test_memory_lru_keeps_the_most_recent(tmp_path: Path) -> None:
    cache = ArrayCache(None, max_entries=2, max_bytes=0)
    cache.put("a", _record(1))
    cache.put("b", _record(2))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", _record(3))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def _entry_files(directory: Path) -> list[Path]:
    """The files that hold records (the index lives beside them, at the top of the folder)."""
    return [p for p in directory.rglob("*") if p.is_file() and p.parent != directory]


def test_disk_roundtrip_is_exact_and_survives_a_new_instance(tmp_path: Path) -> None:
    data = {"embedding": np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32),
            "stats": np.frombuffer(b'{"x": 1}', dtype=np.uint8)}
    ArrayCache(tmp_path, max_entries=4, max_bytes=10**7).put("k1", data)
    fresh = ArrayCache(tmp_path, max_entries=4, max_bytes=10**7)
    got = fresh.get("k1")
    assert got is not None and np.array_equal(got["embedding"], data["embedding"])
    assert got["embedding"].dtype == np.float32 and bytes(got["stats"]) == b'{"x": 1}'
    assert "k1" in fresh and fresh.disk_keys() == ["k1"] and len(_entry_files(tmp_path)) == 1


def test_a_write_that_fails_half_way_leaves_nothing_visible(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = ArrayCache(tmp_path, max_entries=0, max_bytes=10**8)
    cache.put("old", _record(1))

    def savez_then_fail(handle, **arrays):  # type: ignore[no-untyped-def]
        handle.write(b"PK\x03\x04 half a record")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="No space left"):
        cache.put("new", _record(2))
    monkeypatch.undo()
    for reader in (cache, ArrayCache(tmp_path, max_entries=0, max_bytes=10**8)):  # this process and a new one
        assert reader.get("new") is None and "new" not in reader and reader.disk_keys() == ["old"]
        assert reader.get("old") is not None
    assert len(_entry_files(tmp_path)) == 1  # the partial file is gone too


def test_disk_bound_evicts_the_least_recently_used(tmp_path: Path) -> None:
    one = _record(0, n=MIB // 4)  # 1 MiB per record; the index adds a few KiB
    bound = 3 * MIB + MIB // 2
    cache = ArrayCache(tmp_path, max_entries=0, max_bytes=bound)
    for i, key in enumerate(["k0", "k1", "k2"]):
        cache.put(key, _record(i, n=one["embedding"].size))
    assert sorted(cache.disk_keys()) == ["k0", "k1", "k2"]
    assert cache.get("k0") is not None  # memory disabled: a disk hit makes k0 the most recently used
    cache.put("k3", _record(3, n=one["embedding"].size))
    assert sorted(cache.disk_keys()) == ["k0", "k2", "k3"]  # k1 was the least recently used
    assert 3 * MIB < cache.disk_bytes() <= bound
    assert cache.get("k1") is None and len(_entry_files(tmp_path)) == 3  # its file is deleted too


def test_processes_sharing_the_folder_share_the_bound(tmp_path: Path) -> None:
    n = MIB // 4
    bound = 3 * MIB + MIB // 2
    first, second = (ArrayCache(tmp_path, max_entries=0, max_bytes=bound) for _ in range(2))
    for i in range(4):
        first.put(f"a{i}", _record(i, n=n))
        second.put(f"b{i}", _record(i, n=n))
    assert sorted(first.disk_keys()) == sorted(second.disk_keys()) == ["a3", "b2", "b3"]
    assert first.disk_bytes() <= bound and len(_entry_files(tmp_path)) == 3
    got = first.get("b3")
    assert got is not None and got["embedding"][0] == 3.0  # written by the other one


def test_writes_never_list_the_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bound = 3 * MIB + MIB // 2
    cache = ArrayCache(tmp_path, max_entries=2, max_bytes=bound)

    def listing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the cache listed its folder")

    for name in ("scandir", "listdir", "walk"):
        monkeypatch.setattr(os, name, listing)
    monkeypatch.setattr(Path, "glob", listing)
    monkeypatch.setattr(Path, "iterdir", listing)
    for i in range(8):  # past the bound: every write after the third evicts
        cache.put(f"k{i}", _record(i, n=MIB // 4))
    monkeypatch.undo()
    assert sorted(cache.disk_keys()) == ["k5", "k6", "k7"] and cache.disk_bytes() <= bound


@pytest.mark.parametrize("damage", ["garbage", "cut in half"])
def test_damaged_entry_is_a_miss_and_dropped(tmp_path: Path, damage: str) -> None:
    cache = ArrayCache(tmp_path, max_entries=0, max_bytes=10**7)
    cache.put("bad", _record(1))
    cache.put("good", _record(2))
    entry = next(p for p in _entry_files(tmp_path) if np.load(p)["embedding"][0] == 1.0)
    data = entry.read_bytes()
    entry.write_bytes(b"truncated" if damage == "garbage" else data[: len(data) // 2])
    assert cache.get("bad") is None and "bad" not in cache and cache.disk_keys() == ["good"]
    assert not entry.exists() and cache.get("good") is not None
