"""The README's expert-parallel examples run: torchrun with 2 gloo ranks, and JAX shard_map on 4 forced
host devices (each in a subprocess, on the torch path, on CPU also where there is a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **env):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    full_env = dict(os.environ, PYTHONPATH=path, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
                    PYTHONFAULTHANDLER="1", **env)
    full_env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, *args], env=full_env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_ep_torchrun_example():
    out = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "examples/ep_torchrun.py"])
    assert "step 2  loss" in out and "gathered w_up: (8, 256, 64)" in out, out


def test_ep_jax_shard_map_example():
    pytest.importorskip("jax")
    out = _run(["examples/ep_jax_shard_map.py"], XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert "4 devices, loss" in out and "(8, 256, 64)" in out, out
