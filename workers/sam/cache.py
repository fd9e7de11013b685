"""Two-level cache of numpy records: bounded in-memory LRU + bounded on-disk store.

Used for image embeddings (key: image content hash, slice, model, preprocessing signature) and
for decoded slices (key additionally: the slice's prompts, fusion and labels).

Memory: a ``cachetools.LRUCache`` of ``max_entries`` records (the arrays themselves, no copy).
Disk: a ``diskcache.Cache`` (SQLite index + one file per record, the record as uncompressed ``.npz``
bytes) bounded to ``max_bytes`` with least-recently-used eviction (a disk hit counts as a use). The
index keeps the total size, so a write never lists the folder (before: a glob and a stat of every
entry per write). A record's file is complete before its row commits, so a reader never sees half an
entry; processes sharing the folder share the index and its bound. A damaged entry reads as a miss
and is dropped; a locked index (another process) is a miss or a skipped write, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import cachetools
import diskcache
import numpy as np
import numpy.typing as npt

from app.core.hashing import sha256_text

Record = dict[str, npt.NDArray[Any]]

_INDEX_TIMEOUT_S = 10.0  # wait this long for another process's write before giving up (miss / no write)


class _NpzDisk(diskcache.Disk):
    """diskcache's file store, writing a record straight into its file as ``.npz`` (no in-memory copy)."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[int, int, str | None, Any]:
        if type(value) is not dict:
            return super().store(value, read, key=key)
        filename, full_path = self.filename(key, value)
        try:
            with _create(full_path) as handle:
                np.savez(handle, **value)
                size = handle.tell()
        except BaseException:  # no row points at the file yet: nobody sees it; remove what was written
            self.remove(filename)
            raise
        return size, diskcache.core.MODE_BINARY, filename, None


def _create(path: str) -> BinaryIO:
    for attempt in range(10):  # another process may remove an empty sub-folder between makedirs and open
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            return open(path, "xb")
        except FileNotFoundError:
            if attempt == 9:
                raise
    raise AssertionError("unreachable")


def make_key(**parts: object) -> str:
    """Stable sha256 of the given parts (JSON with sorted keys)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_text(text)


class ArrayCache:
    def __init__(self, directory: Path | None, *, max_entries: int, max_bytes: int) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_entries = max(0, int(max_entries))
        self.max_bytes = max(0, int(max_bytes))
        self._memory: cachetools.LRUCache[str, Record] = cachetools.LRUCache(maxsize=max(1, self.max_entries))
        self._lock = threading.Lock()
        self._disk: diskcache.Cache | None = None
        if self.directory is not None:
            # Every record goes to a file (_NpzDisk); at most one eviction per write keeps the
            # bound for records of one size, a larger record is made room for by cull() after the write.
            self._disk = diskcache.Cache(str(self.directory), timeout=_INDEX_TIMEOUT_S, disk=_NpzDisk,
                                         size_limit=self.max_bytes, eviction_policy="least-recently-used",
                                         cull_limit=1, statistics=False)

    # --- public -----------------------------------------------------------------------------
    def get(self, key: str) -> Record | None:
        with self._lock:
            record = self._memory.get(key)
        if record is not None:
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
        """Bytes the disk tier uses: its records and its index (what ``max_bytes`` bounds)."""
        return 0 if self._disk is None else int(self._disk.volume())

    def disk_keys(self) -> list[str]:
        return [] if self._disk is None else [str(key) for key in self._disk.iterkeys()]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._memory:
                return True
        return self._disk is not None and key in self._disk

    # --- memory -------------------------------------------------------------------------------
    def _remember(self, key: str, record: Record) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._memory[key] = record

    # --- disk ---------------------------------------------------------------------------------
    def _read(self, key: str) -> Record | None:
        if self._disk is None:
            return None
        try:
            handle = self._disk.get(key, read=True)  # refreshes the entry's last use
        except diskcache.Timeout:
            return None
        if handle is None:
            return None
        try:
            with handle, np.load(handle, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # damaged entry: a miss, and dropped
            with contextlib.suppress(diskcache.Timeout):
                self._disk.delete(key)
            return None

    def _write(self, key: str, record: Record) -> None:
        if self._disk is None or self.max_bytes == 0:
            return
        try:
            self._disk.set(key, dict(record))
            if self._disk.volume() > self.max_bytes:
                self._disk.cull()
        except diskcache.Timeout:
            return  # another process holds the index: the record stays in memory only
