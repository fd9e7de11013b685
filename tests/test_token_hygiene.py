"""Token hygiene (expiry, last use, no token in a log), security headers and per-token write rate limits."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from app.auth import ratelimit, security
from app.core.config import get_settings
from tests.conftest import ROOT


def _flush_last_used() -> None:
    security._last_used_writer.submit(lambda: None).result(timeout=10)


def _token(client, tokens, **body) -> httpx.Response:  # type: ignore[no-untyped-def]
    return client.post("/api/v1/tokens", json={"name": "temp", "role": "annotator", **body},
                       headers=tokens.headers("admin"))


def _listed(client, tokens, name: str) -> dict:  # type: ignore[no-untyped-def]
    rows = client.get("/api/v1/tokens", params={"limit": 500}, headers=tokens.headers("admin")).json()
    return next(row for row in rows if row["name"] == name)


# ------------------------------------------------------------------ expiry and last use


def test_token_expiry_is_set_by_days_or_time_and_validated(client, tokens) -> None:
    created = _token(client, tokens, expires_in_days=30)
    assert created.status_code == 201, created.text
    expires = datetime.fromisoformat(created.json()["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)
    assert _listed(client, tokens, "temp")["expires_at"] is not None

    at = (datetime.now(UTC) + timedelta(hours=5)).replace(microsecond=0)
    created = _token(client, tokens, name="temp2", expires_at=at.isoformat())
    assert created.status_code == 201 and datetime.fromisoformat(created.json()["expires_at"]) == at
    assert _token(client, tokens, name="forever").json()["expires_at"] is None

    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    for body in ({"expires_at": past}, {"expires_in_days": 0}, {"expires_in_days": 1e9},
                 {"expires_in_days": 1, "expires_at": at.isoformat()}):
        assert _token(client, tokens, name="bad", **body).status_code == 422, body


def test_expired_token_is_refused_even_from_the_process_cache(client, tokens) -> None:
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope

    assert get_settings().token_cache_s >= 5  # the cache alone would accept it for seconds more
    with session_scope() as session:
        _row, secret = create_token(session, "short", Role.annotator, datetime.now(UTC) + timedelta(seconds=1.5))
        _row, lapsed = create_token(session, "lapsed", Role.annotator, datetime.now(UTC) + timedelta(seconds=30))
        session.commit()
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200  # now cached in this process
    entry = security._principals[security.hash_token(secret)]
    assert entry[0] - time.monotonic() <= 1.6  # the cache entry does not outlive the token
    time.sleep(1.7)
    refused = client.get("/api/v1/me", headers=headers)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"

    # Expired in the database (another process set it, or the clock passed): 401 like a revoked token.
    with session_scope() as session:
        from sqlalchemy import text

        session.execute(text("UPDATE api_tokens SET expires_at = now() - interval '1 s' WHERE name = 'lapsed'"))
        session.commit()
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {lapsed}"}).status_code == 401


def test_last_used_is_written_off_the_request_at_most_once_a_minute(client, tokens) -> None:
    security._last_used.clear()  # token ids restart in every test
    assert _listed(client, tokens, "annotator")["last_used_at"] is None
    before = datetime.now(UTC)
    headers = tokens.headers("annotator")
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    _flush_last_used()
    first = _listed(client, tokens, "annotator")["last_used_at"]
    assert first is not None and datetime.fromisoformat(first) >= before - timedelta(seconds=1)

    writes: list[int] = []
    original = security._write_last_used
    security._last_used_writer.submit(lambda: None).result()
    try:
        security._write_last_used = lambda token_id: writes.append(token_id)  # type: ignore[assignment]
        for _ in range(20):
            assert client.get("/api/v1/me", headers=headers).status_code == 200
        _flush_last_used()
    finally:
        security._write_last_used = original  # type: ignore[assignment]
    assert writes == []  # within the minute: no write scheduled at all

    # Another process (its own throttle) within the minute: the UPDATE's condition keeps the value.
    security._last_used.clear()
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    _flush_last_used()
    assert _listed(client, tokens, "annotator")["last_used_at"] == first


def test_cli_creates_a_token_that_expires_and_prints_a_fragment_link(client) -> None:
    env = {**os.environ}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "token", "create", "--name", "cli-exp", "--role", "annotator",
         "--expires", "30d", "--link", "https://crowd.example/"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert re.fullmatch(r"csam_[A-Za-z0-9_-]{40,}", secret)
    assert f"https://crowd.example/annotate#token={secret}" in result.stderr
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 200
    from app.cli import parse_expiry

    assert abs(parse_expiry("12h") - datetime.now(UTC) - timedelta(hours=12)) < timedelta(seconds=5)
    assert parse_expiry("2999-01-01T00:00:00") == datetime(2999, 1, 1, tzinfo=UTC)
    bad = subprocess.run(
        [sys.executable, "-m", "app.cli", "token", "create", "--name", "cli-bad", "--role", "annotator",
         "--expires", "yesterday"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert bad.returncode != 0 and "30d" in bad.stderr


# ------------------------------------------------------------------ security headers


def test_every_response_has_the_security_headers(client, tokens) -> None:
    for path, headers in [("/healthz", {}), ("/annotate", {}), ("/review/1", {}), ("/static/js/page.js", {}),
                          ("/api/v1/me", {}), ("/api/v1/me", tokens.headers("annotator")),
                          ("/api/v1/nothing", {}), ("/openapi.json", {})]:
        response = client.get(path, headers=headers)
        assert response.headers["content-security-policy"] == (
            "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'self'"), path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "no-referrer", path
        assert response.headers["x-frame-options"] == "DENY", path
        assert "strict-transport-security" not in response.headers, path
        assert len(response.headers.get_list("x-frame-options")) == 1, path  # never doubled
    docs = client.get("/docs")  # Swagger UI from its CDN with an inline bootstrap: no default-src there
    assert docs.status_code == 200 and "default-src" not in docs.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]


def test_hsts_only_when_configured(monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    monkeypatch.setenv("CROWDSAM_HSTS_SECONDS", "31536000")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            assert client.get("/healthz").headers["strict-transport-security"] == (
                "max-age=31536000; includeSubDomains")
    finally:
        get_settings.cache_clear()


def test_the_access_log_never_holds_a_token(tmp_path, tokens) -> None:
    """A real ``crowdsam serve`` with its access log on: bearer headers, fragments, even a ?token= query."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-migrate"],
            cwd=ROOT, env=dict(os.environ), stdout=out, stderr=out,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            secret = tokens.annotator
            assert httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
            assert httpx.get(f"{base}/annotate?dataset=1#token={secret}").status_code == 200
            assert httpx.get(f"{base}/annotate?token={secret}&dataset=1").status_code == 200  # an old link
            assert httpx.get(f"{base}/review/1?slice=2&token={secret}").status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = log.read_text()
    assert '"GET /annotate?dataset=1 HTTP/1.1" 200' in text  # the access log is on
    assert "/annotate?token=[redacted]&dataset=1" in text
    assert secret not in text and secret[10:30] not in text


# ------------------------------------------------------------------ rate limits


@pytest.fixture
def limited(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CROWDSAM_RATE_LIMIT_PER_S", "1")
    monkeypatch.setenv("CROWDSAM_RATE_LIMIT_BURST", "3")
    get_settings.cache_clear()
    ratelimit._Health.skip_until = 0.0
    yield
    get_settings.cache_clear()


def test_writes_past_the_rate_answer_429_with_retry_after(client, tokens, limited) -> None:
    annotator, other = tokens.headers("annotator"), tokens.headers("annotator2")
    answers = [client.delete("/api/v1/prompts/999", headers=annotator).status_code for _ in range(3)]
    assert answers == [404, 404, 404]  # the burst
    refused = client.delete("/api/v1/prompts/999", headers=annotator)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert "too many writes" in refused.json()["detail"]
    assert refused.headers["content-security-policy"].startswith("default-src")
    # Per token and route class; reads are never limited.
    assert client.delete("/api/v1/prompts/999", headers=other).status_code == 404
    assert client.delete("/api/v1/volumes/999", headers=tokens.headers("researcher")).status_code == 404
    assert client.get("/api/v1/me", headers=annotator).status_code == 200
    assert client.get("/api/v1/datasets", headers=annotator).status_code == 200
    # An unknown token is refused before it can use a bucket.
    assert client.delete("/api/v1/prompts/999", headers={"Authorization": "Bearer nope"}).status_code == 401
    time.sleep(1.05)  # one write per second refills
    assert client.delete("/api/v1/prompts/999", headers=annotator).status_code == 404
    assert client.delete("/api/v1/prompts/999", headers=annotator).status_code == 429


def test_default_rate_lets_a_shared_crowd_token_through(client, tokens) -> None:
    settings = get_settings()
    assert settings.rate_limit_per_s >= 30 and settings.rate_limit_burst >= 50
    statuses = {client.delete("/api/v1/prompts/999", headers=tokens.headers("annotator")).status_code
                for _ in range(50)}
    assert statuses == {404}


def test_a_redis_outage_lets_writes_through(client, tokens, limited, monkeypatch, caplog) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setattr(ratelimit, "redis_url", lambda: f"redis://127.0.0.1:{dead}/0")
    monkeypatch.setattr(ratelimit._Health, "warned_at", -1e9)
    ratelimit._client.cache_clear()
    ratelimit._script.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="crowdsam.ratelimit"):
            started = time.monotonic()
            statuses = [client.delete("/api/v1/prompts/999", headers=tokens.headers("annotator")).status_code
                        for _ in range(10)]
            elapsed = time.monotonic() - started
    finally:
        ratelimit._client.cache_clear()
        ratelimit._script.cache_clear()
        ratelimit._Health.skip_until = 0.0
    assert statuses == [404] * 10  # fail open: never 500, never 429
    assert elapsed < 3  # no timeout or retry per request
    assert sum("rate limits not enforced" in r.getMessage() for r in caplog.records) == 1


def test_429_is_documented_on_write_routes_only(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    writes = reads = 0
    for path, operations in paths.items():
        if not path.startswith("/api/v1"):
            continue
        for method, operation in operations.items():
            if method in ("post", "put", "patch", "delete"):
                writes += 1
                assert "429" in operation["responses"], (method, path)
            elif method == "get" and "429" not in operation["responses"]:
                reads += 1
    assert writes > 10 and reads > 10
