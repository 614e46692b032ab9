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
SYSTEM_PACKAGES := esorex cpl-plugin-hawki cpl-plugin-vimos chromium prometheus
# podman/buildah build and run the images; debootstrap makes their base where no registry is reachable.
STACK_PACKAGES := podman buildah runc catatonit debootstrap uidmap prometheus

.PHONY: help venv system-deps node-deps demo test test-fast bench contracts lint clean oca-rules \
        images stack-deps stack-test

help:
	@echo "make demo   - install, make synthetic $(DEMO_INSTRUMENT) pre-imaging data, process it in one process"
	@echo "make test   - install everything and run the whole test suite"
	@echo "make bench  - performance figures, one JSON object per line"
	@echo "make images - build the preimg images (podman, else docker; see docker/build-images.sh)"
	@echo "make stack-test - build the images and run them as one pod against real RabbitMQ and Prometheus"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

# esorex, the HAWK-I and VIMOS pipelines, Chromium and promtool (package prometheus) come from
# Debian (needs root). A policy-rc.d that refuses keeps the prometheus package from starting a
# server; it is removed again unless one was there before.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null && $$SUDO chmod +x /usr/sbin/policy-rc.d && guard=1; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; rc=$$?; \
	  if [ -n "$$guard" ]; then $$SUDO rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi
endef

system-deps:
	$(call apt_install,$(SYSTEM_PACKAGES))

stack-deps:
	$(call apt_install,$(STACK_PACKAGES))

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

# The images: wheels built here, installed offline in the image; tags <version>-g<commit>.
images: venv
	docker/build-images.sh

# The images as one pod (RabbitMQ + the four services), with a real Prometheus (needs root;
# esorex on the host makes the synthetic calibration set, cached in .cache/synth).
stack-test: system-deps stack-deps images
	PREIMG_STACK_IMAGES=$(abspath dist/images.env) $(PY) -m pytest -p no:cacheprovider -s -v tests/stack

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
	rm -rf $(VENV) .cache .pytest_cache $(DEMO_ROOT) test-artifacts dist
