# `make demo` and `make test` do all set-up themselves (a .venv; the CPU torch wheel when no
# torch is installed; the existing torch/triton on a GPU machine).
PY := .venv/bin/python
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint gpu-check clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m flashfusemoe.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

lint: setup
	$(PY) -m ruff check .

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf .venv .pytest_cache
