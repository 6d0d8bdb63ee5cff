"""``run_on_cpu``: a Python command of this repository in a subprocess on the CPU torch path."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def with_xla_flags(env, *flags: str) -> str:
    """``env["XLA_FLAGS"]`` with ``flags`` appended (each only if absent). XLA takes a flag's last
    value, so an appended flag overrides the same flag already set with another value."""
    current = env.get("XLA_FLAGS", "")
    return " ".join([current, *(f for f in flags if f not in current.split())]).strip()


def run_on_cpu(args, **env) -> str:
    """Runs ``python *args`` from the repository root with no GPU, JAX on CPU and Triton's
    interpreter off (``env`` adds variables; its ``XLA_FLAGS`` add to those set); asserts it exits 0
    and returns its stdout."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if "XLA_FLAGS" in env:  # added to the ones already set
        env["XLA_FLAGS"] = with_xla_flags(os.environ, *env["XLA_FLAGS"].split())
    full_env = dict(os.environ, PYTHONPATH=path, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
                    PYTHONFAULTHANDLER="1", **env)
    full_env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, *args], env=full_env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
