"""Where one training step of the seed model spends GPU time: the MoE layers' kernels against the rest.

    PYTHONPATH=. python scripts/profile_train.py torch           # benchmarks.train's fused model, compiled
    PYTHONPATH=. python scripts/profile_train.py jax [--no-scan] # benchmarks.train_jax's Flax model, bridge

Builds the model of ``benchmarks.train`` (torch: fused layer, ``torch.compile`` per block, no CUDA
graphs; jax: the Flax NNX model with ``jax_bridge``'s layer, blocks under ``nnx.scan`` unless
``--no-scan``), runs warm-up steps, then one step under ``torch.profiler``, which also sees XLA's
kernels. Kernel time is summed by group: moe (our Triton kernels and the grouped GEMMs), dense
GEMM, attention, optimizer, other; then the top kernels with their launch counts (a count of twice
the MoE layers for a forward kernel means each layer's forward ran twice). On CPU it runs the tiny
model and sums CPU op time (a smoke run).
"""

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import train
from flashfusemoe.profiling import profiled_times

# Kernel-name fragments of the MoE layer: our Triton kernels and torch._grouped_mm's CUTLASS.
MOE_KERNELS = ("_route_", "_layout_", "_glu_", "_combine_rows", "_scatter_rows", "_gather_rows", "_grouped_",
               "_up_glu", "_dgrad_glu", "_gathered_", "prepare_grouped_gemm", "cutlass")


def kernel_group(name: str) -> str:
    n = name.lower()
    if any(k.lower() in n for k in MOE_KERNELS) and not n.startswith("triton_"):
        return "moe (our kernels, grouped GEMMs)"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if "flash" in n or "fmha" in n or "sdpa" in n or "attention" in n:
        return "attention"
    if "gemm" in n or "nvjet" in n or "cublas" in n or "xmma" in n:
        return "dense GEMM"
    return "other"


def report(prof, label: str, wall_ms: float, cuda: bool, top: int) -> None:
    time_us, count = profiled_times(prof, cuda)
    groups = defaultdict(float)
    for name, us in time_us.items():
        groups[kernel_group(name)] += us
    what = "GPU kernel time" if cuda else "CPU op time (tiny model)"
    total_ms = sum(time_us.values()) / 1e3
    print(f"\n{label}: step wall {wall_ms:.1f} ms (under the profiler), {what} {total_ms:.1f} ms")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {us / 1e3:8.1f} ms  {group}")
    for name, us in sorted(time_us.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {us / 1e3:8.2f} ms {count[name]:5d}x  {name[:90]}")


def torch_step(cfg, state, cuda):
    """``benchmarks.train``'s fused-compiled model and step, with its default settings."""
    ap = argparse.ArgumentParser()
    train.add_run_args(ap, steps=1, compile_help="")
    args = ap.parse_args([])
    train.resolve_run_args(args, cuda, "no CUDA device")
    model = train.build_model("fused-compiled", cfg, "cuda" if cuda else "cpu")
    model.load_state_dict(state)
    train.compile_regions(model, args.compile_backend)
    opt = train.make_optimizer(model, args.lr, cuda)

    def step(batch):
        train.train_step(model, opt, batch, args.aux_coef, cuda)
        if cuda:
            torch.cuda.synchronize()

    return step, f"torch fused-compiled ({args.compile_backend} per block, no CUDA graphs)"


def jax_step(cfg, state, cuda, scan):
    """``benchmarks.train_jax``'s bridge model and jitted step, with its default settings."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import train_jax

    args = train_jax.parse_args([] if scan else ["--no-scan"])
    dtype = jnp.bfloat16 if cuda else jnp.float32
    args.attention_impl, _ = train_jax.resolve_attention(args.attention, cuda, dtype)
    train_step, held = train_jax.build_training("bridge", cfg, state, args, dtype)
    held = {"state": held}

    def step(batch):
        held["state"], ce = train_step(held["state"], jnp.asarray(batch.cpu().numpy().astype(np.int32)))
        jax.block_until_ready((held["state"], ce))

    return step, f"jax-bridge (Flax NNX, {'nnx.scan' if scan else 'Python loop'})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("framework", choices=("torch", "jax"))
    ap.add_argument("--no-scan", dest="scan", action="store_false", help="jax: MoE blocks in a Python loop")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    cfg = train.ModelConfig() if cuda else train.TINY
    device = "cuda" if cuda else "cpu"
    state, _ = train.initial_state(cfg, 0, device)
    batches = train.make_batches(cfg, args.warmup + 1, 0, device)
    if args.framework == "torch":
        step, label = torch_step(cfg, state, cuda)
    else:
        step, label = jax_step(cfg, state, cuda, args.scan)
    for batch in batches[:-1]:
        step(batch)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step(batches[-1])
        wall_ms = (time.perf_counter() - start) * 1e3
    report(prof, label, wall_ms, cuda, args.top)


if __name__ == "__main__":
    main()
