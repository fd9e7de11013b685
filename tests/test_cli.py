"""The ``crowdsam`` command, run as a real subprocess against the test database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

ROOT = Path(__file__).resolve().parent.parent
TOKEN = re.compile(r"^csam_[A-Za-z0-9_-]{40,}$")


def crowdsam(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (falls back to ``python -m app.cli``)."""
    script = Path(sys.executable).parent / "crowdsam"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_the_commands():
    result = crowdsam("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "worker", "db", "token"):
        assert command in result.stdout


def test_token_create_prints_only_the_token_and_it_works(client):
    result = crowdsam("token", "create", "--name", "x", "--role", "annotator")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, repr(result.stdout)
    token = result.stdout.strip()
    assert TOKEN.match(token), token
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json()["name"] == "x" and me.json()["role"] == "annotator"
    # The role is enforced: an annotator token may not create datasets.
    forbidden = client.post("/api/v1/datasets", json={"name": "d", "labels": {"liver": 1}},
                            headers={"Authorization": f"Bearer {token}"})
    assert forbidden.status_code == 403


def test_duplicate_token_name_fails():
    assert crowdsam("token", "create", "--name", "dup", "--role", "researcher").returncode == 0
    again = crowdsam("token", "create", "--name", "dup", "--role", "admin")
    assert again.returncode != 0
    assert again.stdout == ""
    assert "already exists" in again.stderr


@pytest.mark.parametrize("args", [["--name", "y", "--role", "root"], ["--role", "admin"]])
def test_token_create_rejects_bad_arguments(args):
    result = crowdsam("token", "create", *args)
    assert result.returncode != 0
    assert result.stdout == ""


def test_db_upgrade_on_a_fresh_database(pytestconfig):
    from app.models import Base
    from tests import services

    server = pytestconfig._crowdsam[0]
    url = services.create_database(server)
    engine = create_engine(url)
    try:
        result = crowdsam("db", "upgrade", env={"DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
        again = crowdsam("db", "upgrade", env={"DATABASE_URL": url})  # idempotent
        assert again.returncode == 0, again.stderr
        down = crowdsam("db", "downgrade", "base", env={"DATABASE_URL": url})
        assert down.returncode == 0, down.stderr
        engine.dispose()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
        services.drop_database(server, url)
