"""Refresh the vendored onnxruntime-web under ``app/static/vendor/onnxruntime-web/`` (SAM's decoder in the page).

Downloads the pinned npm tarball from the registry, checks it against the registry's ``dist.integrity``
(sha512, Subresource-Integrity form), keeps only the files the WebAssembly execution provider loads
(the ESM entry point, its Emscripten glue and the ``.wasm``), writes ``LICENSE`` and ``VERSION`` (version,
tarball URL, integrity, sha256 of every kept file) and swaps the folder in atomically (a rename). No npm,
no build step; run it by hand when the pin moves::

    .venv/bin/python scripts/refresh_onnxruntime_web.py [--version 1.31.1] [--registry https://registry.npmjs.org]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

PACKAGE = "onnxruntime-web"
VERSION = "1.31.1"
# The registry's dist.integrity of the pinned version: a different tarball under the same version is refused.
PINNED_INTEGRITY = ("sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw==")
# The WASM execution provider only: ort.wasm.min.mjs imports ort-wasm-simd-threaded.mjs, which fetches the .wasm.
FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
TARGET = Path(__file__).resolve().parent.parent / "app" / "static" / "vendor" / PACKAGE
# onnxruntime's licence (the npm package declares "MIT" but ships no LICENSE file).
LICENSE = """MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return bytes(response.read())


def check_integrity(blob: bytes, integrity: str) -> None:
    """``integrity`` is ``sha512-<base64>`` (npm's dist.integrity); raise when ``blob`` does not match."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise SystemExit(f"unsupported integrity algorithm {algorithm!r}")
    actual = base64.b64encode(hashlib.sha512(blob).digest()).decode()
    if actual != expected:
        raise SystemExit(f"integrity mismatch: registry says {integrity}, tarball is sha512-{actual}")


def refresh(version: str, registry: str, target: Path = TARGET) -> Path:
    """Download, verify, extract the kept files and swap ``target`` in; returns ``target``."""
    meta = json.loads(_get(f"{registry.rstrip('/')}/{PACKAGE}/{version}"))
    tarball, integrity = meta["dist"]["tarball"], meta["dist"]["integrity"]
    if version == VERSION and integrity != PINNED_INTEGRITY:
        raise SystemExit(f"the registry's integrity for {version} changed: {integrity} (pinned {PINNED_INTEGRITY})")
    blob = _get(tarball)
    check_integrity(blob, integrity)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        sums = {}
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
            for name in FILES:
                member = archive.extractfile(f"package/dist/{name}")
                if member is None:
                    raise SystemExit(f"{name} is missing from {tarball}")
                data = member.read()
                (staging / name).write_bytes(data)
                sums[name] = hashlib.sha256(data).hexdigest()
        (staging / "LICENSE").write_text(LICENSE)
        lines = [f"{PACKAGE} {version}", f"tarball: {tarball}", f"integrity: {integrity}",
                 "refreshed by: scripts/refresh_onnxruntime_web.py (files copied unchanged from package/dist/)",
                 *(f"sha256 {digest}  {name}" for name, digest in sums.items())]
        (staging / "VERSION").write_text("\n".join(lines) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the folder is served
        old = target.with_name(f".{target.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--registry", default="https://registry.npmjs.org")
    args = parser.parse_args(argv)
    path = refresh(args.version, args.registry)
    print(f"{PACKAGE} {args.version} → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
