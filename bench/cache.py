"""Embedding cache (``workers.sam.cache.ArrayCache``): ms per put and per get (memory hit, disk hit, miss).

Records are LiteMedSAM-sized embeddings (float32 (1, 256, 64, 64), 4 MiB). ``--puts`` distinct records
are put into a cache whose disk bound holds ``--disk-entries`` of them, so the later puts evict; the
memory tier holds ``--memory-entries``. Then: gets of the newest keys (memory hits), gets of keys that
are only on disk (after ``clear_memory()``, as in a new worker process), gets of evicted keys (misses).
Disk hits read files the puts just wrote, so they come from the OS page cache: this times the cache's
own work (index, eviction, (de)serialisation), not the drive.

    .venv/bin/python bench/cache.py [--puts 500] [--disk-entries 256] [--memory-entries 32]
                                    [--impl path/to/cache.py]   # another ArrayCache, e.g. an older one
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MIB = 1024**2


def load_impl(path: str | None) -> Any:
    if path is None:
        from workers.sam import cache

        return cache.ArrayCache
    spec = importlib.util.spec_from_file_location("bench_cache_impl", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ArrayCache


Times = list[tuple[float, float]]  # (wall ms, CPU ms of this process) per call


def timed(keys: list[str], op: Callable[[str], Any]) -> tuple[Times, list[Any]]:
    """Wall and CPU milliseconds per call of ``op`` over ``keys``, and its results."""
    times, results = [], []
    for key in keys:
        start, cpu = time.perf_counter(), time.process_time()
        results.append(op(key))
        times.append(((time.perf_counter() - start) * 1000, (time.process_time() - cpu) * 1000))
    return times, results


def line(name: str, times: Times) -> str:
    if not times:
        return f"{name:<16} (none)"
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    return (f"{name:<16} ms/op wall mean {statistics.fmean(wall):7.2f} median {statistics.median(wall):7.2f}"
            f"  cpu mean {statistics.fmean(cpu):7.2f}  (n={len(times)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--puts", type=int, default=500)
    parser.add_argument("--disk-entries", type=int, default=256, help="disk bound, in records")
    parser.add_argument("--memory-entries", type=int, default=32)
    parser.add_argument("--gets", type=int, default=100, help="gets per kind (memory hit, disk hit, miss)")
    parser.add_argument("--shape", default="1,256,64,64", help="record shape (float32); smaller = more entries")
    parser.add_argument("--impl", default=None, help="a cache.py to load ArrayCache from (default: this tree's)")
    parser.add_argument("--dir", default=None, help="parent folder of the cache (default: a temp folder)")
    args = parser.parse_args()

    cache_cls = load_impl(args.impl)
    shape = tuple(int(n) for n in args.shape.split(","))
    base = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    record_bytes = base.nbytes
    bound = args.disk_entries * record_bytes + 4 * MIB  # room for the records plus a small index
    keys = [f"{i:064x}" for i in range(args.puts)]
    root = Path(tempfile.mkdtemp(prefix="crowdsam-bench-cache-", dir=args.dir))
    try:
        cache = cache_cls(root / "embeddings", max_entries=args.memory_entries, max_bytes=bound)

        def put(key: str) -> None:
            record = base.copy()
            record.flat[0] = int(key, 16)  # a distinct record per key (the copy is timed too, ~0.5 ms for 4 MiB)
            cache.put(key, {"embedding": record})

        put_times, _ = timed(keys, put)
        fill = min(args.disk_entries, args.puts)
        on_disk = cache.disk_keys()
        used = cache.disk_bytes()

        n = args.gets
        memory_keys = keys[-min(n, args.memory_entries):]
        memory_times, memory_got = timed(memory_keys, cache.get)
        cache.clear_memory()
        disk_candidates = [k for k in keys if k in set(on_disk)]
        disk_keys = disk_candidates[-n:]
        disk_times, disk_got = timed(disk_keys, cache.get)
        evicted = [k for k in keys if k not in set(on_disk)][:n]
        miss_times, miss_got = timed(evicted, cache.get)

        assert all(r is not None for r in memory_got + disk_got), "a hit came back empty"
        assert all(r is None for r in miss_got), "an evicted key came back"
        for key, got in zip(disk_keys, disk_got, strict=True):
            assert got["embedding"].shape == shape and int(got["embedding"].flat[0]) == int(key, 16), key

        impl = args.impl or "workers/sam/cache.py"
        print(f"cache impl={impl} puts={args.puts} record={record_bytes / MIB:.3g} MiB {shape} "
              f"memory_entries={args.memory_entries} disk_bound={bound / MIB:.0f} MiB ({args.disk_entries} records)")
        print(line("put (filling)", put_times[:fill]))
        print(line("put (evicting)", put_times[fill:]))
        print(line("get memory hit", memory_times))
        print(line("get disk hit", disk_times))
        print(line("get miss", miss_times))
        print(f"disk after the puts: {len(on_disk)} records, {used / MIB:.0f} MiB of {bound / MIB:.0f} MiB "
              f"(bound kept: {used <= bound})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
