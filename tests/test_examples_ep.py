"""The README's expert-parallel examples run: torchrun with 2 gloo ranks, and JAX shard_map on 4 forced
host devices (each in a subprocess, on the torch path, on CPU also where there is a GPU)."""

import pytest
from cpu_subprocess import run_on_cpu


def test_ep_torchrun_example():
    out = run_on_cpu(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "examples/ep_torchrun.py"])
    assert "step 2  loss" in out and "gathered w_up: (8, 256, 64)" in out, out


def test_ep_jax_shard_map_example():
    pytest.importorskip("jax")
    out = run_on_cpu(["examples/ep_jax_shard_map.py"], XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert "4 devices, loss" in out and "(8, 256, 64)" in out, out
