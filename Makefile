# crowdsam — `make demo` and `make test` set everything up from a fresh clone (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= ACTIVE

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
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app workers tests bench
	$(VENV)/bin/mypy

serve: install
	$(VENV)/bin/crowdsam serve

worker: install
	$(VENV)/bin/crowdsam worker

clean:
	rm -rf var demo-output test-artifacts .pytest_cache .mypy_cache .ruff_cache
