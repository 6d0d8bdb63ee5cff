"""The host-time diagnostics in scripts/ run on CPU (each in a subprocess) and print their table."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_bridge_latency_splits_a_call():
    out = _run("scripts/bridge_latency.py", "--backward", "--iters", "3")
    assert "(2 callback(s) per call)" in out
    for row in ("dispatch", "host", "after", "total"):
        assert f"  {row} " in out
    assert "torch fwd+bwd: wall clock" in out


def test_host_overhead_stub():
    out = _run("scripts/host_overhead.py", "--stub", "--profile", "0")
    assert "host time per fwd+bwd call" in out
