"""The demo (``make demo``) runs end to end and checks its own error bounds."""

import os
import subprocess
import sys


def test_demo_runs_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch path: fast
    proc = subprocess.run([sys.executable, "-m", "flashfusemoe.demo", "--shape", "48", "16", "24", "4", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: max relative error" in proc.stdout
    if "JAX bridge" in proc.stdout:
        assert "PASS" in proc.stdout
