"""Safe unpacking of an uploaded prediction archive (zip or tar.gz, e.g. nnU-Net's output folder).

Only regular files named ``{CASE}.nii.gz`` / ``{CASE}.nii`` are taken (by their base name, never their
path: no traversal, no links); anything else (plans.json, summary.json, folders) is skipped and listed.
Sizes are bounded while copying, whatever the archive claims.
"""

from __future__ import annotations

import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from app.core.errors import Invalid, PayloadTooLarge

NIFTI_NAME = re.compile(r"^(?P<case>[A-Za-z0-9][A-Za-z0-9_.-]{0,99}?)\.nii(\.gz)?$")
MAX_MEMBERS = 10_000


@dataclass
class Unpacked:
    files: dict[str, Path] = field(default_factory=dict)  # case id → local file
    skipped: list[str] = field(default_factory=list)


def _copy_bounded(src: IO[bytes], target: Path, budget: int) -> int:
    written = 0
    with target.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise PayloadTooLarge(f"predictions: unpacked archive exceeds {budget} bytes")
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
    """Unpack the NIfTI files of ``archive`` into ``directory``; 422 for anything that is not zip/tar(.gz)."""
    out = Unpacked()
    budget = max_bytes
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > MAX_MEMBERS:
                raise Invalid(f"predictions: archive has more than {MAX_MEMBERS} files")
            for info in infos:
                target = _take(info.filename, out, directory)
                if target is not None:
                    with zf.open(info) as src:
                        budget -= _copy_bounded(src, target, budget)
    else:
        try:
            tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 (closed by the with-block below)
        except tarfile.TarError as exc:
            raise Invalid("predictions: not a zip or tar(.gz) archive") from exc
        with tar:
            count = 0
            for member in tar:
                count += 1
                if count > MAX_MEMBERS:
                    raise Invalid(f"predictions: archive has more than {MAX_MEMBERS} files")
                if not member.isfile():
                    if not member.isdir():
                        out.skipped.append(member.name)
                    continue
                target = _take(member.name, out, directory)
                if target is not None:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    with extracted:
                        budget -= _copy_bounded(extracted, target, budget)
    if not out.files:
        raise Invalid("predictions: the archive holds no {CASE}.nii.gz files")
    return out
