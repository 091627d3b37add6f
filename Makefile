# Two commands on a fresh machine:  `make demo`  and  `make test`  (see README).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup constraints demo lint format test test-fast bench clean-demo nightly-local

setup: $(VENV)/.installed

# constraints.txt pins every resolved package, torch 2.14.1 and torchvision 0.29.1 included (the only pair lpips'
# torchvision import works with here). Constraints apply on top of whatever index the installer uses, so a local
# wheel or a package mirror keeps working, unlike a lock tool that wants its own index.
# uv installs the same pinned set about 3x faster than pip (43 s against 2 min 13 s on a 2-core machine,
# benchmarks/RESULTS.md). uv does not read pip's configuration (pip.conf indexes, find-links): where it cannot
# resolve the set from the package index, pip installs it, as before.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv==0.13.9
	$(BIN)/uv pip install --quiet --no-cache --python $(BIN)/python -c constraints.txt -e '.[dev]' \
	  || { echo "uv could not install the pinned set: installing with pip"; \
	       $(BIN)/pip install --quiet --progress-bar off -c constraints.txt -e '.[dev]'; }
	touch $@

# Re-resolve the newest versions into constraints.txt (then run make test, and commit it if green)
constraints:
	rm -rf .venv-constraints && $(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install --quiet --upgrade pip
	.venv-constraints/bin/pip install --quiet --progress-bar off -e '.[dev,bench]'
	{ sed -n '1,3p' constraints.txt; .venv-constraints/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-constraints

demo: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "DVC needs a git repository: run 'make demo' inside a clone"; exit 1; }
	$(BIN)/dvc repro

# ruff (configured in pyproject.toml) before the tests: lint findings and unformatted files fail `make test`
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

test-fast: lint
	$(BIN)/pytest -m "not slow"

# Speed and memory benchmarks, MONAI side by side (installs the 'bench' extra); results: benchmarks/RESULTS.md
bench: setup
	$(BIN)/pip install --quiet --progress-bar off -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_monai.py
	$(BIN)/python benchmarks/bench_flops.py
	$(BIN)/python benchmarks/bench_memory.py

clean-demo:
	rm -rf data/raw/demo data/ingested data/processed

# Prefect server + work pool + deployment + worker on 127.0.0.1 (Ctrl-C stops them); then
# PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run synthesize/nightly
nightly-local: setup
	scripts/nightly-local.sh
