# crowdsam — `make demo` and `make test` set everything up from a fresh clone (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The whole pytest run's hard limit (CI allows 90 min): SIGTERM makes pytest dump every thread's stack.
# pytest itself stops after 50 min (session_timeout) and bounds every test (tests/conftest.py).
TEST_TIME_LIMIT ?= 55m

.PHONY: install lock browser demo test lint bench serve worker clean

# Exact versions come from the lock (requirements/dev.txt: extras worker, test, embedded, demo), the project
# itself is installed without dependencies. pyproject.toml keeps ranges; `make lock` rewrites the locks.
LOCK := requirements/dev.txt

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Regenerate the locks with pip-compile (pip-tools, from the test extra; it resolves with this machine's pip
# configuration, so torch comes from wherever pip finds it). Existing pins are kept while they satisfy
# pyproject.toml; upgrade with `make lock LOCK_ARGS=--upgrade` or `LOCK_ARGS='--upgrade-package torch'`.
#   dev.txt     everything `make install` installs (make demo, make test)
#   worker.txt  the worker images (Dockerfile targets worker, worker-gpu), pinned like dev.txt
#   api.txt     the API image: no torch, no test tools, no embedded servers
LOCK_FLAGS := --quiet --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) $(LOCK_ARGS)
lock: install
	$(PIP_COMPILE) --extra worker,test,embedded,demo -o requirements/dev.txt pyproject.toml
	$(PIP_COMPILE) -c requirements/dev.txt --extra worker -o requirements/worker.txt pyproject.toml
	$(PIP_COMPILE) -c requirements/dev.txt -o requirements/api.txt pyproject.toml

demo: install
	$(PY) -m scripts.demo

# Headless Chromium for the browser tests (tests/test_web_browser.py): Debian's package.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

test: install browser
	timeout --signal=TERM --kill-after=60 $(TEST_TIME_LIMIT) $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app workers tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # one-way import contracts: [tool.importlinter] in pyproject.toml

serve: install
	$(VENV)/bin/crowdsam serve

worker: install
	$(VENV)/bin/crowdsam worker

clean:
	rm -rf var demo-output test-artifacts .pytest_cache .mypy_cache .ruff_cache
