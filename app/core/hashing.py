"""The project's one SHA-256 helper: hex digests of bytes, text (UTF-8) and files.

Callers that keep a prefix slice the hex themselves (``sha256_text(s)[:16]``), so every key,
signature and checksum stays byte-identical to the ``hashlib.sha256(...).hexdigest()`` it replaced.
Digests fed chunk by chunk as data streams in (uploads, length-prefixed request fingerprints) keep
their own ``hashlib.sha256()`` object.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # files are read 1 MiB at a time


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of ``text`` encoded as UTF-8."""
    return sha256_bytes(text.encode())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
