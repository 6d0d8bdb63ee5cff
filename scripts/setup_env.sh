#!/usr/bin/env bash
# Create $VENV (default .venv) with what the demo, tests and benchmarks need. Idempotent; any
# failure stops it with a message and leaves no stamp, so the next run tries again.
# - torch already importable (an activated venv or conda env, the GPU image): the venv sees those
#   packages and replaces none of them; only what is missing is installed. The interpreter is
#   $PYTHON, else the active venv's ($VIRTUAL_ENV), else python3.
# - Otherwise: the CPU torch wheel and Triton pinned by constraints/cpu.txt, never CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PYTHON=$VIRTUAL_ENV/bin/python
  else
    PYTHON=python3
  fi
fi
origin=$("$PYTHON" -c 'import sys; print(sys.executable, sys.prefix)')
stamp="$VENV/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$origin" ] && [ "$stamp" -nt pyproject.toml ] \
    && [ "$stamp" -nt scripts/setup_env.sh ] && [ "$stamp" -nt constraints/cpu.txt ]; then
  exit 0
fi
rm -f "$stamp"
trap 'echo "setup: FAILED (scripts/setup_env.sh line $LINENO): $VENV is not ready; fix the error above and rerun" >&2' ERR
py="$VENV/bin/python"

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: using the torch already installed for $PYTHON"
  "$PYTHON" -c 'import sys, torch
v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(f"setup: torch {torch.__version__} is older than 2.11, which flashfusemoe needs" if v < (2, 11) else 0)'
  # A venv made from a venv's python sees the base interpreter's packages, not that venv's, and
  # no venv sees user site-packages: add those of $PYTHON (with their .pth files) after $VENV's own.
  "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
  parent_sites=$("$PYTHON" -c 'import os, site, sys
dirs = site.getsitepackages() if sys.prefix != sys.base_prefix else []
if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
    dirs.append(site.getusersitepackages())
print("\n".join(dirs))')
  own_site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  : > "$own_site/_flashfusemoe_parent_env.pth"
  while IFS= read -r dir; do
    [ -z "$dir" ] || echo "import site; site.addsitedir('$dir')" >> "$own_site/_flashfusemoe_parent_env.pth"
  done <<< "$parent_sites"
  "$py" -c "import torch" || { echo "setup: $VENV does not see the torch of $PYTHON" >&2; false; }
  "$py" -m pip --version >/dev/null 2>&1 || "$py" -m ensurepip -q  # the pip it sees installs into $VENV
  # The license metadata (an SPDX expression) needs setuptools >= 77 to build the editable install.
  if ! "$py" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    "$py" -m pip install -q "setuptools>=77"
  fi
  # What is installed already stays (no upgrades); only missing packages are fetched.
  "$py" -m pip install -q --no-build-isolation -e ".[test,jax,bench]"
else
  echo "setup: installing CPU torch, triton, jax into $VENV (about 2 minutes)"
  "$PYTHON" -m venv "$VENV"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -c constraints/cpu.txt -e ".[test,jax,bench,hf]"
fi
# -I: no current directory on sys.path, so this finds flashfusemoe only if it is installed.
"$py" -I - "$PWD" <<'EOF'
import os, sys

import flashfusemoe, torch  # noqa: E401

here = os.path.realpath(os.path.join(sys.argv[1], "flashfusemoe"))
found = os.path.realpath(os.path.dirname(flashfusemoe.__file__))
if found != here:
    sys.exit(f"setup: {sys.executable} imports flashfusemoe from {found}, not from this checkout ({here})")
if sys.platform == "linux":
    import triton  # noqa: F401
print(f"setup: {sys.executable} has torch {torch.__version__} and this checkout's flashfusemoe")
EOF
echo "$origin" > "$stamp"
