#!/usr/bin/env bash
# Create .venv with what the demo, tests and benchmarks need. Idempotent.
# - Machine with torch+triton already importable (the GPU image): the venv sees them
#   (--system-site-packages) and nothing is replaced.
# - Otherwise: the CPU torch wheel and Triton pinned by constraints/cpu.txt, never CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup_env.sh ] \
    && [ "$stamp" -nt constraints/cpu.txt ]; then
  exit 0
fi
if "$PYTHON" -c "import torch, triton" 2>/dev/null; then
  echo "setup: using the torch/triton already installed for $PYTHON"
  "$PYTHON" -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . || true
  for mod in pytest xdist jax flax; do
    "$VENV/bin/python" -c "import $mod" 2>/dev/null || echo "setup: warning: $mod not importable"
  done
else
  echo "setup: installing CPU torch, triton, jax into $VENV (about 2 minutes)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -c constraints/cpu.txt -e ".[test,jax,bench,hf]"
fi
touch "$stamp"
