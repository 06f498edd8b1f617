# attnfuse: `make demo` and `make test` set themselves up (into .venv) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and pinned: 2.13.0 is the CPU build held locally; override for a GPU build,
# e.g. `make setup TORCH="torch==2.14.1"`.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.attnfuse-setup

.PHONY: setup test lint bench demo package-check clean

# Idempotent: a second run with the same TORCH/EXTRAS and an unchanged pyproject.toml does nothing.
setup:
	@want="$(TORCH) [$(EXTRAS)]"; \
	if [ -x $(BIN)/python ] && [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$want" ] && [ $(STAMP) -nt pyproject.toml ]; then \
		echo "setup: $(VENV) is up to date ($$want)"; \
	else \
		set -e; \
		[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
		$(BIN)/python -m pip install --quiet "$(TORCH)"; \
		$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"; \
		echo "$$want" > $(STAMP); \
		echo "setup: installed $$want into $(VENV)"; \
	fi

test: setup
	$(BIN)/lint-imports --config pyproject.toml
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/lint-imports --config pyproject.toml

# The built wheel, installed into fresh virtual environments without extras (torch + numpy: `--help`, `list`,
# `quickstart` work, training commands name the extra in one line) and with [train], run from outside the
# repository (tests/cli/test_packaging.py; ~2 min, pip's cache reused).
package-check: setup
	ATTNFUSE_TEST_PACKAGING=1 ATTNFUSE_TEST_TORCH="$(TORCH)" $(BIN)/python -m pytest tests/cli/test_packaging.py -k wheel_in_fresh

bench: setup
	$(BIN)/python -m benchmarks.run

demo: setup
	$(BIN)/attnfuse demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis runs
