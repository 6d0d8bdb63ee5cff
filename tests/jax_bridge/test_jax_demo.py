"""The JAX half of ``make demo`` runs end to end and checks its own bounds."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")


def test_jax_demo_runs_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch path: fast
    proc = subprocess.run([sys.executable, "-m", "jax_bridge.demo", "--shape", "48", "16", "24", "4", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout
