"""The host-time diagnostics in scripts/ run on CPU (each in a subprocess) and print their table."""

import pytest
from cpu_subprocess import run_on_cpu


def test_bridge_latency_splits_a_call():
    out = run_on_cpu(["scripts/bridge_latency.py", "--backward", "--iters", "3"])
    assert "(2 callback(s) per call)" in out
    for row in ("dispatch", "host", "after", "total"):
        assert f"  {row} " in out
    assert "torch fwd+bwd: wall clock" in out


def test_bridge_latency_floor_times_both_frameworks():
    out = run_on_cpu(["scripts/bridge_latency.py", "--floor", "--floor-ms", "0.5", "--iters", "3"])
    assert "synced" in out and "pipelined" in out
    assert "\n  jax " in out and "\n  torch " in out
    assert "\n  jax+bc " in out and "\n  jax+ffi " in out


def test_bridge_latency_on_the_ffi_call():
    out = run_on_cpu(["scripts/bridge_latency.py", "--backward", "--iters", "3", "--ffi"])
    assert "(2 callback(s) per call)" in out and "  total " in out


def test_host_overhead_stub():
    out = run_on_cpu(["scripts/host_overhead.py", "--stub", "--profile", "0"])
    assert "host time per fwd+bwd call" in out
    # FastLaunch's own repeat-launch path ran (only the C launcher is stubbed)
    launches = int(out.split("FastLaunch repeat launches per fwd+bwd (stubbed C launcher): ")[1].split()[0])
    assert launches >= 8


def test_host_overhead_floor_times_a_launch_free_function():
    out = run_on_cpu(["scripts/host_overhead.py", "--stub", "--floor"])
    assert "host time per fused_moe fwd+bwd call" in out
    assert "host time per launch-free autograd.Function fwd+bwd call" in out


def test_host_overhead_samples_stacks():
    out = run_on_cpu(["scripts/host_overhead.py", "--stub", "--sample"])
    assert "300 steps in" in out and "-- innermost flashfusemoe frame" in out
    assert "flashfusemoe/" not in out.split("-- innermost flashfusemoe frame")[1].split("\n")[1]


def test_profile_hf_groups_a_step():
    pytest.importorskip("transformers")
    out = run_on_cpu(["scripts/profile_hf.py", "--impl", "flashfusemoe", "--top", "3"])
    assert "qwen3-moe / flashfusemoe: CPU op time (tiny model)" in out
    assert " ms  other (elementwise, reductions, copies)" in out


def test_profile_hf_experts_lists_gemm_ops():
    pytest.importorskip("transformers")
    out = run_on_cpu(["scripts/profile_hf.py", "--experts", "--model", "mixtral",
                      "--impl", "grouped_mm", "flashfusemoe"])
    for impl in ("grouped_mm", "flashfusemoe"):
        assert f"mixtral experts / {impl} (N=32, D=32, E=4, K=2):" in out
    assert "ms  aten::mm (" in out and " ms in all; by name:" in out


def test_bench_experts_times_both_gemms():
    out = run_on_cpu(["scripts/bench_experts.py", "--shapes", "fine"])
    assert "fine     grouped   fwd+bwd" in out and "fine     gathered/grouped" in out


def test_profile_train_groups_a_step_in_both_frameworks():
    out = run_on_cpu(["scripts/profile_train.py", "torch", "--warmup", "1", "--top", "3"])
    assert "torch fused-compiled" in out and "CPU op time (tiny model)" in out
    out = run_on_cpu(["scripts/profile_train.py", "jax", "--no-scan", "--warmup", "1", "--top", "3"])
    assert "jax-bridge (Flax NNX, Python loop)" in out
