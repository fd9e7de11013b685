"""Two-level cache of numpy records: bounded in-memory LRU + bounded on-disk store.

Used for image embeddings (key: image content hash, slice, model, preprocessing signature) and
for decoded slices (key additionally: the slice's prompts, fusion and labels). Disk entries are
``<key>.npz`` files written atomically (temp file + ``os.replace``); when the directory grows past
``max_bytes`` the least recently used files (oldest mtime; a hit refreshes it) are deleted first.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.core.hashing import sha256_text

Record = dict[str, npt.NDArray[Any]]


def make_key(**parts: object) -> str:
    """Stable sha256 of the given parts (JSON with sorted keys)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_text(text)


class ArrayCache:
    def __init__(self, directory: Path | None, *, max_entries: int, max_bytes: int) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_entries = max(0, int(max_entries))
        self.max_bytes = max(0, int(max_bytes))
        self._memory: OrderedDict[str, Record] = OrderedDict()
        self._lock = threading.Lock()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    # --- public -----------------------------------------------------------------------------
    def get(self, key: str) -> Record | None:
        with self._lock:
            record = self._memory.get(key)
            if record is not None:
                self._memory.move_to_end(key)
                return record
        record = self._read(key)
        if record is not None:
            self._remember(key, record)
        return record

    def put(self, key: str, record: Record) -> None:
        self._remember(key, record)
        self._write(key, record)

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()

    def disk_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def disk_keys(self) -> list[str]:
        return [path.stem for path, _, _ in self._entries()]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._memory:
                return True
        path = self._path(key)
        return path is not None and path.is_file()

    # --- memory -------------------------------------------------------------------------------
    def _remember(self, key: str, record: Record) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._memory[key] = record
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)

    # --- disk ---------------------------------------------------------------------------------
    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.npz"

    def _read(self, key: str) -> Record | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                record = {name: data[name] for name in data.files}
        except (OSError, ValueError):  # truncated/corrupt file: treat as a miss and drop it
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return record

    def _write(self, key: str, record: Record) -> None:
        path = self._path(key)
        if path is None or self.max_bytes == 0:
            return
        assert self.directory is not None
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **record)  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._evict(keep=path)

    def _entries(self) -> list[tuple[Path, int, int]]:
        if self.directory is None:
            return []
        out = []
        for path in self.directory.glob("*.npz"):
            if path.name.startswith(".tmp-"):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            out.append((path, stat.st_size, stat.st_mtime_ns))
        return out

    def _evict(self, keep: Path) -> None:
        entries = sorted(self._entries(), key=lambda e: (e[2], e[0].name))
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
