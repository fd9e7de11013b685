"""Artefact store on fsspec: the local data dir by default, S3-compatible storage (``s3://bucket/prefix``) or
any other fsspec URL to scale out.

Every write is atomic: readers see either nothing or the complete object (local: temp file + rename; S3: a PUT
or a completed multipart upload makes the whole object visible at once). Keys are relative, validated paths
such as ``volumes/12/image.nii.gz`` — never user-supplied names. Large objects are streamed both ways; only
``read_bytes`` holds an object in memory (small JSON/HTML artefacts).

S3 endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), read by
botocore; ``CROWDSAM_STORAGE_OPTIONS`` adds fsspec options. Listings are never cached, so processes on
different hosts see each other's writes at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from app.core.config import get_settings
from app.core.hashing import sha256_file as sha256_file  # re-exported: workers import it from here

# Memory of one stream is a few buffers of these, whatever the object's size (botocore copies a part ~2x):
UPLOAD_PART = 8 * 2**20  # S3 multipart part size (S3's minimum is 5 MiB)
UPLOAD_CONCURRENCY = 2  # parts in flight per upload: peak ~2 x this x UPLOAD_PART
READ_BLOCK = 4 * 2**20  # ranged GET size of open(): peak ~3.5 x this
MAX_PARTS = 10_000  # S3's limit of parts per multipart upload
S3_PROTOCOLS = ("s3", "s3a")
MIRROR_FILES = 64  # local copies of remote objects kept per host (:meth:`Storage.mirror`)


class StorageUnavailable(RuntimeError):
    """The store cannot be used (missing bucket, unreachable endpoint); the message names no secret."""


class Storage:
    def __init__(self, url: str, options: Mapping[str, Any] | None = None, mirror_dir: Path | None = None) -> None:
        self.url = url
        self.mirror_dir = mirror_dir  # where :meth:`mirror` keeps local copies of remote objects
        protocol, _ = fsspec.core.split_protocol(url)
        self.is_s3 = protocol in S3_PROTOCOLS
        opts = dict(options or {})
        if self.is_s3:
            opts.setdefault("use_listings_cache", False)  # another host's writes are visible at once
        self.fs, root = fsspec.core.url_to_fs(url, **opts)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:  # the URL only: options may hold credentials
        return f"Storage({self.url!r})"

    def _path(self, key: str) -> str:
        norm = posixpath.normpath(key)
        if not key or norm.startswith(("/", "..")) or "\\" in key or norm == ".":
            raise ValueError(f"invalid storage key {key!r}")
        return f"{self.root}/{norm}"

    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the store is usable (S3: the bucket exists and answers)."""
        if self.is_local:
            if not os.access(self.root, os.W_OK):
                raise StorageUnavailable(f"store directory {self.root} is not writable")
            return
        if not self.is_s3:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise StorageUnavailable(f"bucket {bucket!r} does not exist (create it first)") from None
        except Exception as exc:
            raise StorageUnavailable(f"S3 store unreachable: {type(exc).__name__}") from None

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def put_file(self, key: str, local_path: Path) -> None:
        """Copy a finished local file into the store atomically, streaming it.

        Local: copy to a temp name, then rename. S3: one PUT (files up to 2 parts) or a multipart upload of
        ``UPLOAD_PART`` parts, ``UPLOAD_CONCURRENCY`` at a time; S3 makes an object visible only when its PUT
        or multipart upload completes, so readers never see half an object, and a failed upload is aborted.
        """
        target = self._path(key)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            with _replacing(Path(target)) as tmp:
                shutil.copyfile(local_path, tmp)
        elif self.is_s3:
            chunk = max(UPLOAD_PART, math.ceil(os.path.getsize(local_path) / MAX_PARTS))
            self.fs.put_file(str(local_path), target, chunksize=chunk, max_concurrency=UPLOAD_CONCURRENCY)
        else:
            self.fs.put_file(str(local_path), target)

    def write_bytes(self, key: str, data: bytes) -> None:
        """A small object from memory (one PUT when remote)."""
        if not self.is_local:
            self.fs.pipe_file(self._path(key), data)
            return
        fd, name = tempfile.mkstemp()
        try:  # the local temp file goes even when writing it fails (a full temp dir)
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
            self.put_file(key, Path(name))
        finally:
            os.unlink(name)

    def read_bytes(self, key: str) -> bytes:
        """The whole object in memory: for small objects only; stream large ones with :meth:`open`."""
        return bytes(self.fs.cat_file(self._path(key)))

    def open(self, key: str) -> IO[bytes]:
        """A binary reader; remote objects are read in ranged requests of ``READ_BLOCK``."""
        if self.is_local:
            return self.fs.open(self._path(key), "rb")
        return self.fs.open(self._path(key), "rb", block_size=READ_BLOCK, cache_type="readahead")

    def download(self, key: str, local_path: Path) -> None:
        """Stream an object into a local file."""
        self.fs.get_file(self._path(key), str(local_path))

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local path for libraries that need one (nibabel); streams a temporary download when remote."""
        path = self._path(key)
        if self.is_local:
            yield Path(path)
            return
        suffix = "".join(Path(key).suffixes)
        with tempfile.TemporaryDirectory() as tmpdir:
            local = Path(tmpdir) / f"object{suffix}"
            self.fs.get_file(path, str(local))
            yield local

    def mirror(self, key: str) -> Path:
        """A local file with the object's bytes that stays valid to memory-map: the object itself when local;
        for a remote store a copy under ``mirror_dir`` named by key and ETag (a rewritten object gets a new
        copy), downloaded once per host by streaming into a temp file that is renamed into place. The
        ``MIRROR_FILES`` most recently used copies are kept (a removed copy stays readable by its open maps)."""
        if self.is_local:
            return Path(self._path(key))
        if self.mirror_dir is None:
            raise RuntimeError("this store has no mirror_dir for local copies of remote objects")
        info = self.fs.info(self._path(key))
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
        version = str(info.get("ETag") or info.get("etag") or f"{info.get('size')}-{stamp}")
        digest = hashlib.sha256(f"{self.url}\0{key}\0{version}".encode()).hexdigest()[:32]
        target = self.mirror_dir / f"{digest}{''.join(Path(key).suffixes)}"
        if target.exists():
            os.utime(target)
            return target
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        with _replacing(target) as tmp:
            self.download(key, tmp)
        self._prune_mirror()
        return target

    def _prune_mirror(self) -> None:
        assert self.mirror_dir is not None
        copies = sorted((p for p in self.mirror_dir.iterdir() if ".tmp-" not in p.name),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in copies[MIRROR_FILES:]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix/`` (not ``prefix1/``); a missing prefix is no error."""
        path = self._path(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear(self) -> None:
        """Delete every object of this store (tests, a fresh deployment); never the bucket itself."""
        if self.is_local:
            shutil.rmtree(self.root, ignore_errors=True)
            Path(self.root).mkdir(parents=True, exist_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            objects = self.fs.find(self.root)
            if objects:
                self.fs.rm(objects)


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """A temp path beside ``target`` to write; renamed onto ``target`` when the block succeeds, else removed."""
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@lru_cache
def get_storage() -> Storage:
    settings = get_settings()
    return Storage(settings.store_url, settings.storage_options, mirror_dir=settings.cache_dir / "store-mirror")
