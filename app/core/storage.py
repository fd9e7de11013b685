"""Artefact store on fsspec: the local data dir by default, any fsspec URL (s3://...) to scale out.

Every write is atomic: readers see either nothing or the complete object. Keys are relative,
validated paths such as ``volumes/12/image.nii.gz`` — never user-supplied names.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from app.core.config import get_settings
from app.core.hashing import sha256_file as sha256_file  # re-exported: workers import it from here


class Storage:
    def __init__(self, url: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        norm = posixpath.normpath(key)
        if not key or norm.startswith(("/", "..")) or "\\" in key or norm == ".":
            raise ValueError(f"invalid storage key {key!r}")
        return f"{self.root}/{norm}"

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def put_file(self, key: str, local_path: Path) -> None:
        """Copy a finished local file into the store atomically."""
        target = self._path(key)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            try:
                shutil.copyfile(local_path, tmp)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.put_file(str(local_path), target)

    def write_bytes(self, key: str, data: bytes) -> None:
        fd, name = tempfile.mkstemp()
        try:  # the local temp file goes even when writing it fails (a full temp dir)
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
            self.put_file(key, Path(name))
        finally:
            os.unlink(name)

    def read_bytes(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(key)))

    def open(self, key: str) -> IO[bytes]:
        return self.fs.open(self._path(key), "rb")

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local path for libraries that need one (nibabel); downloads when remote."""
        path = self._path(key)
        if self.is_local:
            yield Path(path)
            return
        suffix = "".join(Path(key).suffixes)
        with tempfile.TemporaryDirectory() as tmpdir:
            local = Path(tmpdir) / f"object{suffix}"
            self.fs.get_file(path, str(local))
            yield local

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


@lru_cache
def get_storage() -> Storage:
    return Storage(get_settings().store_url)
