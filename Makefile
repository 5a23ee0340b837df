# Two-command quick start: `make run` serves the service, `make test` runs the tests. Both create .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
CONFIG_FILE ?= $(or $(PRIVATE_LLM_CONFIG),config.ini)
DEBIAN_TEST_PACKAGES := chromium espeak-ng poppler-utils wrk sox nginx-light caddy systemd redis-server

.PHONY: run test test-deps fuzz bench clean

$(RUNTIME_STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

$(CONFIG_FILE): | $(RUNTIME_STAMP)
	$(PY) config.py init $(CONFIG_FILE)

run: $(RUNTIME_STAMP) $(CONFIG_FILE)
	$(PY) runAll.py

test-deps:
	@bash .ci/installDebianPackages $(DEBIAN_TEST_PACKAGES)

test: $(DEV_STAMP) test-deps
	$(PY) -m pytest

# The document mutation fuzz at length (make test runs 300 cases): FUZZ_CASES=20000 FUZZ_SEED=5 make fuzz
FUZZ_CASES ?= 5000
FUZZ_SEED ?= 17
fuzz: $(DEV_STAMP)
	POWERON_FUZZ_CASES=$(FUZZ_CASES) POWERON_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest tests/test_documentFuzz.py -q -s

bench: $(DEV_STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) tests/artifacts
