# Two commands: `make demo` and `make test`. Both set everything up from nothing first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The venv is stamped with the hash of what it was built from: re-running never reinstalls.
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
ASSETS_STAMP := $(VENV)/.visdom-assets
PIP_QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }

.PHONY: setup demo test test-fast lint browser bench clean gpu-bundle gpu-rehearsal
.DEFAULT_GOAL := demo

setup: $(STAMP) $(ASSETS_STAMP)

$(STAMP):
	rm -f $(VENV)/.installed-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# visdom 0.2.4 is an sdist whose setup.py imports pkg_resources (gone in setuptools 82).
	$(BIN)/pip install -q "setuptools>=77.0.3,<82" wheel $(PIP_QUIET)
	$(BIN)/pip install -q --no-build-isolation -r requirements.txt $(PIP_QUIET)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e . $(PIP_QUIET)
	touch $@

# Visdom's JS/CSS/fonts, installed once from the npm registry so its server works offline.
$(ASSETS_STAMP): $(STAMP)
	$(BIN)/runner dashboards install-assets
	touch $@

# Headless Chromium for the browser tests (Debian package; never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/runner dashboards up
	$(eval DEMO_NAME := demo-$(shell date +%Y%m%d-%H%M%S))
	$(BIN)/runner train --model tinyunet --data synthetic --steps 200 --batch-size 8 \
	  --image-size 64 --viz both --images-every 50 --hist-every 50 --name $(DEMO_NAME)
	@echo
	@echo "TensorBoard:  http://127.0.0.1:6006   (or: $(BIN)/tensorboard --logdir runs)"
	@echo "Visdom:       http://127.0.0.1:8097   (env: tinyunet-synthetic_$(DEMO_NAME))"
	@echo "Stop both:    $(BIN)/runner dashboards down"

# Four workers on two cores: most tests wait on processes, servers and timeouts; a file stays on one worker
# (its module-scoped runs are shared), and each worker's processes use one math thread (tests/conftest.py).
test: setup browser
	$(BIN)/python -m pytest -q -n 4 --dist loadfile

# Style and bugs (ruff), the layering and the torch-free commands (import-linter, contracts in pyproject.toml),
# types of the torch-free packages (mypy, [tool.mypy] in pyproject.toml).
lint: setup
	$(BIN)/ruff check runner dashboards scripts tests examples
	$(BIN)/lint-imports
	$(BIN)/mypy

# The suite without the slow end-to-end cases (servers, torchrun, browsers).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python scripts/bench_overhead.py

# What the GPU machine (no registry) lacks, in one git-ignored folder that travels with the tree: wheels
# for Python 3.12 and Visdom's assets. The line that installs it there: scripts/gpu_acceptance.py --dry-run.
gpu-bundle: setup
	$(BIN)/python -m scripts.gpu_checks.bundle build .gpu-bundle
	touch $(BUNDLE_STAMP)

# The GPU window rehearsed here, no GPU or torch needed: a fresh Python 3.12 venv with the GPU image's
# packages, the bundle installed by the README's line (--no-index), --dry-run and recorded failures
# through every check. The bundle is rebuilt only when what it is built from changes.
BUNDLE_STAMP := .gpu-bundle/.built-$(REQ_HASH)
$(BUNDLE_STAMP):
	$(MAKE) gpu-bundle

gpu-rehearsal: $(BUNDLE_STAMP)
	scripts/gpu_checks/rehearsal.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
