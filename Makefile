# Fresh machine with Python >= 3.11 and make:  `make run` (pipeline)  /  `make test` (whole suite).
# A GPU machine picks its torch build, e.g.:
#   make run TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.installed

export PATH := $(abspath $(VENV))/bin:$(PATH)
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

.PHONY: install run test browser postgres bench clean FORCE

install: $(STAMP)

# torch goes in first and pinned, then is frozen by a constraint, so no later resolver step can
# swap the CPU build for a multi-GB CUDA one. The stamp makes re-runs a no-op until
# pyproject.toml, this Makefile or TORCH_SPEC changes.
$(STAMP): pyproject.toml Makefile $(VENV)/.torch-spec
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "genmodels needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0])'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(VENV)/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/torch-constraint.txt
	$(PIP) install --quiet --constraint $(VENV)/torch-constraint.txt -e ".[test]"
	touch $@

$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC) $(TORCH_PIP_ARGS)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(TORCH_PIP_ARGS)' > $@

run: install
	dvc repro
	@genmodels status

# -X faulthandler: a crash after pytest's own handler is gone (at interpreter exit) still prints its stacks.
test: install browser postgres
	python -X faulthandler -m pytest

# The report test drives a real headless Chromium: Debian's packages, never a downloaded build.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  test "$$(id -u)" = 0 || { echo "make test needs chromium and chromedriver: sudo apt-get install chromium chromium-driver" >&2; exit 1; }; \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }; }

# The tracking-load test starts throwaway PostgreSQL clusters of its own (as the package's
# `postgres` user when run as root) from Debian's server binaries, never the package's cluster.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  test "$$(id -u)" = 0 || { echo "make test needs PostgreSQL's server: sudo apt-get install postgresql" >&2; exit 1; }; \
	  apt-get install -y -q --no-install-recommends postgresql >/dev/null || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends postgresql >/dev/null; }; }

bench: install
	python bench/data.py
	python bench/train.py
	python bench/fid.py --threads 2

clean:
	rm -rf $(VENV) data/shards
