# Two-command quick start: `make run` serves the service, `make test` runs the tests. Both create .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test bench clean

$(RUNTIME_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

config.ini: | $(RUNTIME_STAMP)
	$(PY) config.py init config.ini

run: $(RUNTIME_STAMP) config.ini
	$(PY) app.py

test: $(DEV_STAMP)
	$(PY) -m pytest

bench: $(DEV_STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) tests/artifacts
