"""One-way imports, enforced: the import-linter contracts in pyproject.toml (``[tool.importlinter]``).

- ``app`` never imports ``workers`` (except the ``crowdsam worker`` command's lazy import);
- ``app.core`` imports no domain package (auth, datasets, volumes, …);
- ``app.imaging`` is pure: no fastapi, sqlalchemy, torch, database or storage;
- torch is imported only under ``workers``.

The run-time side (``import app.main`` loads no ``workers.*`` and sets no environment variable) is
tests/test_process_policy.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _lint_imports() -> str:
    found = Path(sys.executable).with_name("lint-imports")
    return str(found) if found.exists() else (shutil.which("lint-imports") or "lint-imports")


def test_import_contracts_are_kept() -> None:
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


def test_the_contracts_cover_the_four_rules() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["include_external_packages"] is True
    names = [contract["name"] for contract in config["contracts"]]
    assert len(names) == 4, names
    forbidden = {contract["source_modules"][0]: set() for contract in config["contracts"]}
    for contract in config["contracts"]:
        assert contract["type"] == "forbidden"
        forbidden[contract["source_modules"][0]] |= set(contract["forbidden_modules"])
    assert {"workers", "torch"} <= forbidden["app"]
    assert {"app.auth", "app.jobs", "app.web"} <= forbidden["app.core"]
    assert {"fastapi", "sqlalchemy", "torch", "app.core.db", "app.core.storage"} <= forbidden["app.imaging"]
