"""``run_on_cpu``: a Python command of this repository in a subprocess on the CPU torch path."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_cpu(args, **env) -> str:
    """Runs ``python *args`` from the repository root with no GPU, JAX on CPU and Triton's
    interpreter off (``env`` adds variables); asserts it exits 0 and returns its stdout."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    full_env = dict(os.environ, PYTHONPATH=path, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
                    PYTHONFAULTHANDLER="1", **env)
    full_env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, *args], env=full_env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
