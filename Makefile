# `make demo` and `make test` do all set-up themselves (scripts/setup_env.sh): a venv, $(VENV),
# that uses the torch already installed (the GPU image, an activated venv or conda env) or else
# gets the CPU torch wheel.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint gpu-check clean

setup:
	@VENV="$(VENV)" bash scripts/setup_env.sh

demo: setup
	$(PY) -m flashfusemoe.demo
	@if $(PY) -c "import jax" 2>/dev/null; then $(PY) -m jax_bridge.demo; \
	else echo "jax is not installed: no JAX demo (pip install \"flashfusemoe[jax]\")"; fi

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

lint: setup
	$(PY) -m ruff check .

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf "$(VENV)" .pytest_cache
