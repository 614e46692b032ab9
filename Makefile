# preimg — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PREIMG := $(VENV)/bin/preimg
STAMP := $(VENV)/.installed
DEMO_ROOT ?= preimg-data
DEMO_INSTRUMENT ?= HAWKI
# HAWK-I window per chip (64..2048; empty: synth's default, 128)
DEMO_SIZE ?=
SYSTEM_PACKAGES := esorex cpl-plugin-hawki cpl-plugin-vimos chromium

.PHONY: help venv system-deps node-deps demo test test-fast bench contracts lint clean oca-rules

help:
	@echo "make demo   - install, make synthetic $(DEMO_INSTRUMENT) pre-imaging data, process it in one process"
	@echo "make test   - install everything and run the whole test suite"
	@echo "make bench  - performance figures, one JSON object per line"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

# esorex, the HAWK-I and VIMOS pipelines and Chromium come from Debian (needs root).
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

# node and npm run the contract checks (tests/contracts: ajv, the AsyncAPI parser). Only when node
# is absent: a node from elsewhere (e.g. NodeSource, npm included) is kept.
node-deps:
	@if ! command -v node >/dev/null; then \
	  echo "installing Debian packages: nodejs npm"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends nodejs npm; \
	fi

# ESO's rule files of eight pipelines (extracted from Debian packages, not committed).
oca-rules:
	@if [ -x scripts/fetch-oca-rules.sh ]; then scripts/fetch-oca-rules.sh .cache/oca-rules; fi

# Options only the synthetic data need (small windows) come from the overlay synth writes beside them.
demo: system-deps venv
	$(PREIMG) synth -i $(DEMO_INSTRUMENT) --out $(DEMO_ROOT)/incoming/$(DEMO_INSTRUMENT) --cal-root $(DEMO_ROOT)/cal $(if $(DEMO_SIZE),--size $(DEMO_SIZE))
	overlay=$(abspath $(DEMO_ROOT))/cal/$(DEMO_INSTRUMENT)/profile-overlay.toml; \
	if [ -f "$$overlay" ]; then export PREIMG_PROFILE_OVERLAY="$$overlay"; fi; \
	$(PREIMG) run -i $(DEMO_INSTRUMENT) $(DEMO_ROOT)/incoming/$(DEMO_INSTRUMENT) --data-root $(DEMO_ROOT)

test: system-deps node-deps venv oca-rules
	$(PY) -m pytest

# No broker, no esorex, no browser/S3/SMTP server processes: about a minute.
test-fast: venv
	$(PY) -m pytest -m "not rabbitmq and not esorex and not slow"

bench: system-deps venv
	@for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

contracts: venv
	$(PY) -m shared.contracts docs

lint: venv
	$(VENV)/bin/ruff check shared services synth tests bench

clean:
	rm -rf $(VENV) .cache .pytest_cache $(DEMO_ROOT) test-artifacts
