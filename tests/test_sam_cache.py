"""Embedding/decode cache: memory LRU bound, atomic disk entries, disk bound evicts the oldest."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from workers.sam.cache import ArrayCache, make_key


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


def test_disk_roundtrip_is_exact_and_survives_a_new_instance(tmp_path: Path) -> None:
    data = {"embedding": np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32),
            "stats": np.frombuffer(b'{"x": 1}', dtype=np.uint8)}
    ArrayCache(tmp_path, max_entries=4, max_bytes=10**7).put("k1", data)
    fresh = ArrayCache(tmp_path, max_entries=4, max_bytes=10**7)
    got = fresh.get("k1")
    assert got is not None and np.array_equal(got["embedding"], data["embedding"])
    assert got["embedding"].dtype == np.float32 and bytes(got["stats"]) == b'{"x": 1}'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temp files left


def test_disk_bound_evicts_the_oldest(tmp_path: Path) -> None:
    size = ArrayCache(tmp_path / "probe", max_entries=0, max_bytes=10**9)
    size.put("probe", _record(0))
    one = size.disk_bytes()
    cache = ArrayCache(tmp_path / "store", max_entries=0, max_bytes=3 * one)
    for i, key in enumerate(["k0", "k1", "k2"]):
        cache.put(key, _record(i))
        os.utime(cache.directory / f"{key}.npz", ns=(time.time_ns() - (10 - i) * 10**9,) * 2)  # k0 oldest
    assert sorted(cache.disk_keys()) == ["k0", "k1", "k2"]
    assert cache.get("k0") is not None  # memory disabled: a disk hit refreshes k0's age
    cache.put("k3", _record(3))
    assert sorted(cache.disk_keys()) == ["k0", "k2", "k3"]  # k1 was the least recently used
    assert cache.disk_bytes() <= 3 * one
    assert cache.get("k1") is None


def test_corrupt_entry_is_a_miss(tmp_path: Path) -> None:
    cache = ArrayCache(tmp_path, max_entries=0, max_bytes=10**7)
    (tmp_path / "bad.npz").write_bytes(b"truncated")
    assert cache.get("bad") is None and not (tmp_path / "bad.npz").exists()
