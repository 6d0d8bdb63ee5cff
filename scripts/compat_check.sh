#!/usr/bin/env bash
# Runs the CPU test suite (Triton interpreter, sm_90 AOT compile of every kernel, the JAX bridge)
# against another version of the stack, in a throwaway venv.
#
#   scripts/compat_check.sh PYTHON TORCH TRITON [JAX]
#   scripts/compat_check.sh python3.11 2.13.0 3.9.0
#   scripts/compat_check.sh /root/.pyenv/versions/3.12.1/bin/python 2.13.0 3.7.1 0.12.0.1
#
# Only torch 2.13.0 has a CPU wheel on the usual index; other torch versions install the CUDA
# build (several GB), which runs the CPU suite all the same. jax >= 0.11 needs Python >= 3.12.
# Extra pytest arguments go in PYTEST_ARGS (default: the whole suite, 2 workers).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 PYTHON TORCH TRITON [JAX]" >&2
  exit 2
fi
python=$1 torch_version=$2 triton_version=$3 jax_version=${4:-}
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/ffmoe-compat-torch$torch_version-triton$triton_version${jax_version:+-jax$jax_version}}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
{
  echo "torch==$torch_version"
  echo "triton==$triton_version"
  if [ -n "$jax_version" ]; then
    echo "jax==$jax_version"
    echo "jaxlib==$jax_version"
  fi
} > "$constraints"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
"$venv/bin/pip" install -q -c "$constraints" -e ".[test,jax,bench,hf]"
"$venv/bin/python" -c "import sys, torch, triton, jax, flax, numpy
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__,
      '| jax', jax.__version__, '| flax', flax.__version__, '| numpy', numpy.__version__)"
# shellcheck disable=SC2086
"$venv/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:--n 2 tests}
