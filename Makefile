# The two README commands: `make train` (set up, then train the default model) and
# `make test` (set up, then run the test suite). Each creates .venv on first use.
# TORCH is installed first: on the dev machines torch==2.13.0 is the local CPU wheel;
# elsewhere set e.g. TORCH="torch>=2.4" (or a CUDA build) to suit the machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: setup train test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel  # the build backend (pyproject)
	$(BIN)/python -m pip install -q "$(TORCH)"
	# compat: the checkout goes on sys.path, so a folder named composer beside a script cannot hide the
	# package (setuptools calls the mode transitional: without it, the default editable install)
	$(BIN)/python -m pip install -q -e ".[dev]" --config-settings editable_mode=compat \
		|| $(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/composer-train $(ARGS)

test: lint  # two pytest-xdist workers (the suite takes about 7 minutes on 2 cores; WORKERS=0 runs it serially)
	$(BIN)/python -m pytest -q -n $(WORKERS) $(ARGS)

lint: setup  # the rules, the layout (ruff format) and the one-way import layers (import-linter, pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

bench: setup
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
