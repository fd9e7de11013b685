"""Safe unpacking of an uploaded prediction archive (zip or tar, plain or gz/bz2/xz, e.g. nnU-Net's output folder).

Only regular files named ``{CASE}.nii.gz`` / ``{CASE}.nii`` are taken (by their base name, never their
path: no traversal, no links); anything else (plans.json, summary.json, folders, links) is skipped and listed.
Cost is bounded whatever the archive claims: at most ``MAX_MEMBERS`` entries (a zip's central directory is
sized before it is parsed), and at most ``max_bytes`` decompressed over the whole archive (413): a zip's
skipped members are never decompressed, a tar's stream is counted as it is decompressed, skipped members
included (a compressed tar cannot be skipped through without decompressing it). A damaged archive (truncated,
bad gzip, corrupt zip, encrypted or unsupported members) is a 422 naming the problem, never a 500.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from app.core.errors import Invalid, PayloadTooLarge

NIFTI_NAME = re.compile(r"^(?P<case>[A-Za-z0-9][A-Za-z0-9_.-]{0,99}?)\.nii(\.gz)?$")
MAX_MEMBERS = 10_000
MAX_CENTRAL_DIRECTORY_BYTES = MAX_MEMBERS * 512  # a zip's entries are parsed into memory at once
COPY_BYTES = 1 << 20
# What a damaged archive raises while it is read (an OSError with an errno, such as ENOSPC, is the server's).
_DAMAGED = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError,
            NotImplementedError, RuntimeError)


@dataclass
class Unpacked:
    files: dict[str, Path] = field(default_factory=dict)  # case id → local file
    skipped: list[str] = field(default_factory=list)


def _damaged(exc: BaseException) -> bool:
    return isinstance(exc, _DAMAGED) and not (isinstance(exc, OSError) and exc.errno is not None)


def _too_large(budget: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"predictions: the unpacked archive exceeds {budget} bytes (CROWDSAM_MAX_UPLOAD_BYTES)")


class _Counted:
    """A read-only file object that counts the bytes read through it and refuses more than ``budget``."""

    def __init__(self, raw: IO[bytes], budget: int) -> None:
        self.raw, self.budget, self.count = raw, budget, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size >= 0 else self.budget + 1 - self.count)
        self.count += len(data)
        if self.count > self.budget:
            raise _too_large(self.budget)
        return data


def _copy(src: IO[bytes] | _Counted, target: Path, budget: int | None = None) -> int:
    written = 0
    with target.open("wb") as out:
        while chunk := src.read(COPY_BYTES):
            written += len(chunk)
            if budget is not None and written > budget:
                raise _too_large(budget)
            out.write(chunk)
    return written


def _take(name: str, out: Unpacked, directory: Path) -> Path | None:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    match = NIFTI_NAME.match(base)
    if match is None or base.startswith("._"):
        out.skipped.append(name)
        return None
    case = match.group("case")
    if case in out.files:
        raise Invalid(f"predictions: more than one file for case {case!r}")
    target = directory / f"{case}{'.nii.gz' if base.endswith('.gz') else '.nii'}"
    out.files[case] = target
    return target


def unpack(archive: Path, directory: Path, *, max_bytes: int) -> Unpacked:
    """Unpack the NIfTI files of ``archive`` into ``directory``; 422 for anything that is not a sound zip/tar."""
    out = Unpacked()
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, directory, max_bytes, out)
        else:
            _unpack_tar(archive, directory, max_bytes, out)
    except Exception as exc:
        if isinstance(exc, (Invalid, PayloadTooLarge)) or not _damaged(exc):
            raise
        raise Invalid(f"predictions: the archive is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    if not out.files:
        raise Invalid("predictions: the archive holds no {CASE}.nii.gz files")
    return out


def _unpack_zip(archive: Path, directory: Path, budget: int, out: Unpacked) -> None:
    with archive.open("rb") as fh:  # zipfile's own (private) reader of the end record: entries and size, unparsed
        end = getattr(zipfile, "_EndRecData")(fh)  # noqa: B009
    if end is None:
        raise Invalid("predictions: corrupt zip (no end of central directory)")
    entries, size = end[getattr(zipfile, "_ECD_ENTRIES_TOTAL")], end[getattr(zipfile, "_ECD_SIZE")]  # noqa: B009
    if entries > MAX_MEMBERS or size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise Invalid(f"predictions: archive has more than {MAX_MEMBERS} files")
    with zipfile.ZipFile(archive) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_MEMBERS:
            raise Invalid(f"predictions: archive has more than {MAX_MEMBERS} files")
        taken: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in infos:
            link = stat.S_ISLNK(info.external_attr >> 16)
            target = None if link else _take(info.filename, out, directory)
            if link:
                out.skipped.append(info.filename)
            elif target is not None:
                taken.append((info, target))
        if sum(info.file_size for info, _ in taken) > budget:  # what the archive claims; checked again below
            raise _too_large(budget)
        left = budget
        for info, target in taken:  # skipped members are never decompressed
            with zf.open(info) as src:
                left -= _copy(src, target, left)


def _decompressed(fh: IO[bytes]) -> IO[bytes]:
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return cast(IO[bytes], gzip.GzipFile(fileobj=fh, mode="rb"))
    if magic.startswith(b"BZh"):
        return cast(IO[bytes], bz2.BZ2File(fh, mode="rb"))
    if magic.startswith(b"\xfd7zXZ\x00"):
        return cast(IO[bytes], lzma.LZMAFile(fh, mode="rb"))
    return fh


def _unpack_tar(archive: Path, directory: Path, budget: int, out: Unpacked) -> None:
    with archive.open("rb") as fh, _decompressed(fh) as raw:
        counted = _Counted(raw, budget)  # every decompressed byte, skipped members included
        try:
            tar = tarfile.open(fileobj=cast(IO[bytes], counted), mode="r|")  # noqa: SIM115 (closed by the with-block)
        except tarfile.ReadError as exc:  # the first header (a damaged compressed stream raises something else)
            raise Invalid(f"predictions: not a zip or tar(.gz) archive ({exc})") from exc
        with tar:
            count = 0
            for member in tar:
                count += 1
                if count > MAX_MEMBERS:
                    raise Invalid(f"predictions: archive has more than {MAX_MEMBERS} files")
                if not member.isfile():
                    if not member.isdir():
                        out.skipped.append(member.name)  # links, devices, fifos: never followed
                    continue
                target = _take(member.name, out, directory)
                if target is not None:
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        raise Invalid(f"predictions: cannot read {member.name!r}")
                    with extracted:
                        _copy(extracted, target)  # counted (and capped) by ``counted``
