"""The docs name only files that exist: every repository path in docs/DESIGN.md and README.md.

A path is a token that starts with one of the repository's top-level folders (``app/``, ``workers/``,
``docs/`` …) or is a top-level file (``Makefile``, ``pyproject.toml`` …). ``{a,b}`` is expanded, ``<name>``
and ``*`` are wildcards that must match at least one file. A bare file name in backquotes
(```fusion.py```) must exist somewhere in the repository unless it is listed in ``ELSEWHERE`` (files of
other projects the docs talk about).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["docs/DESIGN.md", "README.md"]
FOLDERS = ("app", "workers", "bench", "docs", "tests", "scripts", "migrations", "data", "checkpoints",
           "requirements", ".ci")
TOP_FILES = ("Makefile", "Dockerfile", "docker-compose.yml", "pyproject.toml", "alembic.ini", ".dockerignore")
_FOLDERS = "|".join(re.escape(folder) for folder in FOLDERS)
PATH = re.compile(r"(?<![\w./-])((?:" + _FOLDERS + r")/[\w./{},*<>-]*)")
BARE = re.compile(r"`([\w-]+\.(?:py|md|js|css|html|toml|ya?ml|ini|txt|lock))`")
# Files of other projects that the docs mention by name.
ELSEWHERE = {"bbox.py"}
SKIP_DIRS = {".git", ".venv", "node_modules", "var", "demo-output", "test-artifacts"}


@pytest.fixture(autouse=True)
def clean_state() -> None:
    """No database or Redis here: skip conftest's per-test reset."""


def _expand(path: str) -> list[str]:
    """``workers/{a,b}.py`` → both; nested braces are not used in the docs."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _named(doc: str) -> set[str]:
    text = (ROOT / doc).read_text()
    found: set[str] = set()
    for raw in PATH.findall(text):
        found.update(p.rstrip(".,:;)") for p in _expand(raw.rstrip(".,:;)")))
    found.update(name for name in TOP_FILES if re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w/-])", text))
    return found


def _exists(path: str) -> bool:
    pattern = re.sub(r"<[^<>/]*>", "*", path).rstrip("/")
    if "*" in pattern:
        return any(True for _ in ROOT.glob(pattern))
    return (ROOT / pattern).exists()


def _repository_files() -> set[str]:
    names: set[str] = set()
    for path in ROOT.rglob("*"):
        if not SKIP_DIRS & set(path.relative_to(ROOT).parts):
            names.add(path.name)
    return names


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_named_in_the_docs_exists(doc: str) -> None:
    named = _named(doc)
    assert named, f"no paths found in {doc}: the pattern is broken"
    missing = sorted(path for path in named if not _exists(path))
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_bare_file_name_in_the_docs_exists(doc: str) -> None:
    names = set(BARE.findall((ROOT / doc).read_text())) - ELSEWHERE
    missing = sorted(names - _repository_files())
    assert not missing, f"{doc} names files that exist nowhere in the repository: {missing}"


def test_the_path_pattern() -> None:
    assert _expand("workers/{aggregate,nnunet}.py") == ["workers/aggregate.py", "workers/nnunet.py"]
    assert _exists("app/<domain>/jobs.py") and not _exists("app/<domain>/no_such_module.py")
    assert PATH.findall("see `app/core/db.py`, ../shared/data/README.md and http://h/docs/x") == ["app/core/db.py"]
