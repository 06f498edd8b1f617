# attnfuse: `make demo` and `make test` set themselves up (into .venv) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and pinned: 2.13.0 is the CPU build held locally; override for a GPU build,
# e.g. `make setup TORCH="torch==2.14.1"`.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.attnfuse-setup

.PHONY: setup test lint bench demo clean

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

bench: setup
	$(BIN)/python -m benchmarks.run

demo: setup
	$(BIN)/attnfuse demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis runs
