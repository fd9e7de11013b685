# crowdsam — `make demo` and `make test` set everything up from a fresh clone (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The whole pytest run's hard limit (CI allows 90 min): SIGTERM makes pytest dump every thread's stack.
# pytest itself stops after 50 min (session_timeout) and bounds every test (tests/conftest.py).
TEST_TIME_LIMIT ?= 55m

.PHONY: install browser demo test lint bench serve worker clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m app.demo

# Headless Chromium for the browser tests (tests/test_web_browser.py): Debian's package.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

test: install browser
	timeout --signal=TERM --kill-after=60 $(TEST_TIME_LIMIT) $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app workers tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # one-way import contracts: [tool.importlinter] in pyproject.toml

serve: install
	$(VENV)/bin/crowdsam serve

worker: install
	$(VENV)/bin/crowdsam worker

clean:
	rm -rf var demo-output test-artifacts .pytest_cache .mypy_cache .ruff_cache
