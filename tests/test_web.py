"""The web pages and their assets are served by the API, need no token, and load nothing from outside."""

from __future__ import annotations

import re

from app.imaging.palette import PALETTE, label_colors
from app.web.router import STATIC_DIR


def test_pages_are_public_html(client) -> None:
    for path in ("/annotate", "/annotate?token=abc&dataset=1", "/review/1", "/review/999999"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers["referrer-policy"] == "no-referrer"  # a ?token= never leaks via Referer
        assert "<canvas" in response.text


def test_review_needs_a_numeric_volume_id(client) -> None:
    assert client.get("/review/abc").status_code == 422


def test_static_assets_have_their_types(client) -> None:
    expected = {
        "/static/css/app.css": "text/css",
        "/static/js/annotate.js": "text/javascript",
        "/static/js/review.js": "text/javascript",
        "/static/palette.js": "text/javascript",
        "/static/js/sam.js": "text/javascript",
        "/static/js/sam-core.js": "text/javascript",
        "/static/js/sam-worker.js": "text/javascript",
        "/static/vendor/onnxruntime-web/ort.wasm.min.mjs": "text/javascript",
        "/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.mjs": "text/javascript",
        "/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm": "application/wasm",
    }
    for path, kind in expected.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(kind), path


def test_static_never_serves_outside_its_folder(client) -> None:
    for path in (
        "/static/../web/router.py",
        "/static/%2e%2e/web/router.py",
        "/static/..%2F..%2Fmain.py",
        "/static/annotate.html",  # pages only under their own routes
        "/static/js/missing.js",
        "/static/",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "from __future__" not in response.text


def test_every_referenced_asset_exists(client) -> None:
    """Each page's scripts/styles and each module's imports resolve to served files."""
    pending = ["/annotate", "/review/1"]
    seen: set[str] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        response = client.get(path)
        assert response.status_code == 200, path
        refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', response.text)
        refs += [
            ref if ref.startswith("/") else path.rsplit("/", 1)[0] + "/" + ref.removeprefix("./")
            for ref in re.findall(r"""^import .* from '([^']+)';""", response.text, re.M)
        ]
        pending.extend(refs)
    assert {"/static/js/annotate.js", "/static/js/review.js", "/static/js/outbox.js", "/static/palette.js"} <= seen


def test_no_third_party_urls_in_assets() -> None:
    """No CDN, fonts or trackers: nothing under app/static names another origin."""
    # What the browser loads as text (the .wasm is binary; vendor/*/VERSION, the provenance note, is not served).
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file() and p.suffix in {".html", ".js", ".mjs", ".css", ".svg"}]
    assert len(files) >= 8
    # onnxruntime-web (vendored, unchanged) names one page in a console warning text; it fetches nothing there.
    known = "https://web.dev/cross-origin-isolation-guide/"
    for path in files:
        text = path.read_text()
        if path.is_relative_to(STATIC_DIR / "vendor"):
            text = text.replace(known, "")
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path


def test_vendored_onnxruntime_web_matches_its_provenance(client) -> None:
    """app/static/vendor/onnxruntime-web: the files VERSION lists, unchanged (sha256), served with their types."""
    import hashlib

    folder = STATIC_DIR / "vendor" / "onnxruntime-web"
    version = (folder / "VERSION").read_text()
    assert "integrity: sha512-" in version and "tarball: https://registry.npmjs.org/onnxruntime-web/-/" in version
    assert "MIT License" in (folder / "LICENSE").read_text()
    listed = dict(line.split()[::-1][:2] for line in version.splitlines() if line.startswith("sha256 "))
    assert set(listed) == {p.name for p in folder.iterdir()} - {"VERSION", "LICENSE"}
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    wasm = client.get("/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
    assert wasm.content[:4] == b"\0asm"
    assert client.get("/static/vendor/onnxruntime-web/VERSION").status_code == 404  # not an asset type


def test_palette_module_matches_python(client) -> None:
    body = client.get("/static/palette.js").text
    numbers = [int(n) for n in re.findall(r"\d+", body.split("=", 1)[1].split(";", 1)[0])]
    assert numbers == [c for rgb in PALETTE for c in rgb]
    # label_colors (used by GET /tasks/next) and labelColor() agree on the formula (value - 1) % len
    assert label_colors({"a": 1, "b": len(PALETTE) + 1}) == {"a": "#e69f00", "b": "#e69f00"}
    assert "(value - 1) % PALETTE.length" in body
