"""Browser pages: the crowd annotation page and the researcher review page, plus their static assets.

The pages are public HTML/JS that hold no data: the user supplies a token and every API call the
pages make carries it. No third-party CDN, no build step: plain ES modules under ``app/static``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from app.core.admission import exempt
from app.core.errors import NotFound
from app.imaging.palette import PALETTE

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",  # vendored onnxruntime-web (Python's mimetypes may not know .mjs)
    ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming insists on it
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Pages and assets change with deployments: let browsers revalidate (FileResponse sends ETag). Cross-origin
# isolation (COOP + COEP; everything the pages load is same-origin) gives them SharedArrayBuffer, so the in-page
# SAM decoder (onnxruntime-web) may use several threads; without it (plain http on a LAN address) it uses one.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
_PAGE_HEADERS = {**_HEADERS, "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}

router = APIRouter(tags=["web"])


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=_TYPES[".html"], headers=_PAGE_HEADERS)


@router.get("/annotate", response_class=FileResponse, include_in_schema=False)
@exempt
def annotate_page() -> FileResponse:
    """Crowd annotation page: draw boxes on the slice the service hands out."""
    return _page("annotate.html")


@router.get("/review/{volume_id}", response_class=FileResponse, include_in_schema=False)
@exempt
def review_page(volume_id: int) -> FileResponse:
    """Researcher review page for one volume (the id is read by the page's script)."""
    return _page("review.html")


@router.get("/static/palette.js", include_in_schema=False)
@exempt
def palette_module() -> Response:
    """The label palette of ``app.imaging.palette`` as an ES module (one source of truth for colours)."""
    body = (
        "// Generated from app/imaging/palette.py.\n"
        f"export const PALETTE = {json.dumps([list(c) for c in PALETTE])};\n"
        "export function labelColor(value) {\n"
        "  const [r, g, b] = PALETTE[(value - 1) % PALETTE.length];\n"
        "  return '#' + [r, g, b].map((c) => c.toString(16).padStart(2, '0')).join('');\n"
        "}\n"
    )
    return Response(body, media_type=_TYPES[".js"], headers=_HEADERS)


@router.get("/static/{path:path}", response_class=FileResponse, include_in_schema=False)
@exempt
def static_asset(path: str) -> FileResponse:
    """A file under ``app/static`` (never outside it; only known asset types)."""
    target = (STATIC_DIR / path).resolve()
    if (
        not target.is_relative_to(STATIC_DIR)
        or not target.is_file()
        or target.suffix not in _TYPES
        or target.suffix == ".html"
    ):
        raise NotFound(f"no static asset {path!r}")
    return FileResponse(target, media_type=_TYPES[target.suffix], headers=_HEADERS)
