"""Bounded cost per request: body limits per route kind, no idle-in-transaction upload, RFC 6266 filenames."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from app.core.admission import PREBUFFER_BYTES
from tests.conftest import ABDOMEN_LABELS, CT_DIR, TOTALSEG_MAP, upload

CHUNK = 64 * 1024
DEFAULT_JSON_LIMIT = 8 * 1024 * 1024


def _drive(app: Any, path: str, headers: list[tuple[bytes, bytes]], body: bytes | None) -> tuple[int, dict[str, Any],
                                                                                                  int]:
    """Run one request through the ASGI app; ``body=None`` is an endless chunked body. (status, json, bytes read)."""
    received = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if body is None:
            chunk, more = b"[" * CHUNK, True
        else:
            chunk, more = body[received: received + CHUNK], received + CHUNK < len(body)
        received += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(payload), received


def _bulk(n: int) -> bytes:
    boxes = [{"slice": i % 50, "label": "liver", "box": [10.5, 20.25, 30.75, 40.125], "client_id": str(uuid.uuid4())}
             for i in range(n)]
    return json.dumps({"boxes": boxes}, separators=(",", ":")).encode()


def test_json_route_refuses_a_declared_oversized_body_before_reading_it(tokens):
    from app.main import create_app

    auth = tokens.headers("annotator")["Authorization"].encode()
    status, body, read = _drive(create_app(), "/api/v1/volumes/1/prompts", [
        (b"content-type", b"application/json"), (b"content-length", b"13000000"), (b"authorization", auth)], None)
    assert status == 413
    assert body["detail"] == f"request body exceeds the limit of {DEFAULT_JSON_LIMIT} bytes (CROWDSAM_MAX_JSON_BYTES)"
    assert read <= PREBUFFER_BYTES + CHUNK  # only what the admission gate reads ahead


def test_json_bulk_of_200k_boxes_is_413_without_parsing(tokens):
    """The reported body: 13 MB of 200k boxes, chunked. Before: parsed whole (+227 MB, 4.2 s), then a 422."""
    from app.main import create_app

    data = _bulk(200_000)
    assert len(data) > DEFAULT_JSON_LIMIT
    app = create_app()
    auth = tokens.headers("annotator")["Authorization"].encode()
    headers = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked"), (b"authorization", auth)]
    tracemalloc.start()
    try:
        started = time.perf_counter()
        status, body, read = _drive(app, "/api/v1/volumes/1/prompts", headers, data)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413 and "CROWDSAM_MAX_JSON_BYTES" in body["detail"], body
    assert read <= DEFAULT_JSON_LIMIT + CHUNK
    assert peak < 3 * DEFAULT_JSON_LIMIT, f"peak {peak / 2**20:.0f} MiB"  # the chunks read, never a parsed body
    print(f"200k boxes ({len(data) / 2**20:.1f} MiB): 413 after {elapsed:.2f} s, peak {peak / 2**20:.1f} MiB")


def test_largest_legitimate_bulk_fits_the_default_limit():
    """20k boxes (the per-request cap) with long labels, full-precision floats and client ids: < 8 MiB."""
    boxes = [{"slice": 2047, "label": "x" * 100, "box": [1234.5678901234567] * 4, "client_id": str(uuid.uuid4())}
             for _ in range(20_000)]
    data = json.dumps({"boxes": boxes, "seen": list(range(20_000))}).encode()
    assert len(data) < DEFAULT_JSON_LIMIT


def test_schema_documents_the_list_caps(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PromptBatch"]["properties"]
    assert schema["boxes"]["maxItems"] == schema["points"]["maxItems"] == schema["seen"]["maxItems"] == 20_000


@pytest.fixture
def small_json_client(monkeypatch) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("CROWDSAM_MAX_JSON_BYTES", "100000")
    get_settings.cache_clear()
    with TestClient(create_app()) as test_client:
        yield test_client
    monkeypatch.delenv("CROWDSAM_MAX_JSON_BYTES")
    get_settings.cache_clear()


def test_uploads_keep_the_upload_limit_everything_else_gets_the_json_limit(small_json_client, tokens, dataset):
    client, headers = small_json_client, tokens.headers("researcher")
    image = CT_DIR / "example_ct_sm.nii.gz"
    assert image.stat().st_size > 100_000
    # multipart to a heavy route: the upload limit (1 GiB)
    created = upload(client, tokens, dataset["id"], image)
    assert created.status_code == 201, created.text
    # multipart to an ordinary route, JSON to a heavy route (simulate): the JSON limit
    for path, kwargs in [
        ("/api/v1/datasets", {"files": {"labels": ("x", image.read_bytes())}}),
        (f"/api/v1/volumes/{created.json()['id']}/prompts/simulate",
         {"content": json.dumps({"labels": ["liver"] * 20_000}), "headers": {"content-type": "application/json"}}),
        (f"/api/v1/volumes/{created.json()['id']}/prompts",
         {"content": _bulk(2000), "headers": {"content-type": "application/json"}}),
    ]:
        extra = kwargs.pop("headers", {})
        response = client.post(path, headers={**headers, **extra}, **kwargs)
        assert response.status_code == 413, (path, response.text)
        assert response.json()["detail"].endswith("limit of 100000 bytes (CROWDSAM_MAX_JSON_BYTES)")


# --- an evaluation upload holds no connection while its body arrives ----------------------------------------------
def _idle_in_transaction() -> int:
    from sqlalchemy import text

    from app.core.db import get_engine

    with get_engine().connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")).scalar_one())


def test_slow_evaluation_upload_holds_no_connection_idle_in_transaction(live_server, client, tokens, dataset):
    server = live_server.removeprefix("http://")
    from app.auth import security

    security._principals.clear()  # the token lookup (a query) runs in this request
    host, port = server.split(":")
    boundary = "slowuploadboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"predictions\"; filename=\"p.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    payload = b"not an archive" * 1000
    request = (f"POST /api/v1/datasets/{dataset['id']}/evaluations HTTP/1.1\r\nHost: {server}\r\n"
               f"Authorization: {tokens.headers('researcher')['Authorization']}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {len(head) + len(payload) + len(tail)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request + head + payload[:100])
        time.sleep(1.0)  # the request is inside the route, waiting for the rest of its body
        seen = [_idle_in_transaction()]
        sock.sendall(payload[100:5000])
        time.sleep(0.5)
        seen.append(_idle_in_transaction())
        sock.sendall(payload[5000:] + tail)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 422"), response[:300]
    assert b"not a zip or tar" in response
    assert seen == [0, 0], f"connections idle in transaction during the upload: {seen}"


# --- RFC 6266 filenames ---------------------------------------------------------------------------------------------
def test_mask_download_of_a_non_latin1_label_has_an_rfc6266_filename(client, tokens):
    from urllib.parse import unquote

    from sqlalchemy import update

    from app.core.db import session_scope
    from app.segmentations.models import Segmentation
    from tests.helpers_exporteval import add_finished_segmentation

    label = "Leber-ß-肝"
    labels = {**{k: v for k, v in ABDOMEN_LABELS.items() if k != "liver"}, label: 5}
    headers = tokens.headers("researcher")
    response = client.post("/api/v1/datasets", json={"name": "de", "labels": labels}, headers=headers)
    assert response.status_code == 201, response.text
    mapping = {**TOTALSEG_MAP, "5": label}
    volume = upload(client, tokens, response.json()["id"], CT_DIR / "example_ct_sm.nii.gz",
                    CT_DIR / "example_seg.nii.gz", case_id="sm", reference_map=json.dumps(mapping),
                    reference_other="background")
    assert volume.status_code == 201, volume.text
    sid, _, mask = add_finished_segmentation(volume.json()["id"], labels=labels)
    with session_scope() as session:
        session.execute(update(Segmentation).where(Segmentation.id == sid).values(mask_sha256="0" * 64))
        session.commit()

    response = client.get(f"/api/v1/segmentations/{sid}/mask", params={"label": label}, headers=headers)
    assert response.status_code == 200, response.text
    disposition = response.headers["content-disposition"]
    assert disposition.isascii()
    assert 'attachment; filename="sm_seg1_Leber-_-_.nii.gz"' in disposition
    assert disposition.endswith("filename*=UTF-8''" + "sm_seg1_Leber-%C3%9F-%E8%82%9D.nii.gz")
    assert unquote(disposition.split("''", 1)[1]) == f"sm_seg1_{label}.nii.gz"
    import gzip

    import nibabel as nib

    binary = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert np.array_equal(np.asarray(binary.dataobj) == 1, mask == 5)
    plain = client.get(f"/api/v1/segmentations/{sid}/mask", headers=headers)
    assert plain.headers["content-disposition"] == 'attachment; filename="sm_seg1.nii.gz"'
