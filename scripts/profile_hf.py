"""Where one transformers training step spends GPU time, per experts implementation.

    PYTHONPATH=. python scripts/profile_hf.py [--model qwen3-moe|mixtral] [--impl grouped_mm flashfusemoe]
    PYTHONPATH=. python scripts/profile_hf.py --experts [--model mixtral]

Builds the model of ``benchmarks.hf`` (same config, bf16, AdamW, 8 x 2048 tokens), runs two
warm-up steps, then one step under ``torch.profiler`` and sums the GPU kernels' time by group:
attention, optimizer, experts (Triton kernels and grouped GEMMs), dense GEMMs (cuBLAS), other
(elementwise, reductions, copies), then lists the top kernels. Only kernels are summed (CPU ops'
device totals would count their kernels twice). On CPU it runs a tiny model and sums CPU op time
instead (a smoke run).

``--experts`` profiles only the first layer's experts module, forward and backward on the
same 16384 tokens and routing for every implementation: its GEMM ops in launch order with their
operand shapes and GPU time (which implementation's grouped GEMMs are faster, and which ones),
then the kernels summed by name.
"""

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.hf import MODELS, build_model, step_fn
from flashfusemoe.profiling import profiled_times


def kernel_group(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if n.startswith("_") and "kernel" in n or "grouped" in n or "cutlass" in n:
        return "experts (Triton, grouped GEMM)"
    if "gemm" in n or "nvjet" in n or "cublas" in n or "sm90_xmma" in n:
        return "dense GEMM (cuBLAS)"
    return "other (elementwise, reductions, copies)"


GEMM_OPS = ("aten::_grouped_mm", "aten::mm", "aten::bmm", "aten::addmm")


def profile_experts(args, cuda, device, dtype, sync):
    """Each implementation's experts module of one layer, fwd+bwd on the same inputs."""
    n_tokens, shown = (16384, 12) if cuda else (32, 3)
    experts = {}
    for impl in args.impl:
        model = build_model(args.model, impl, not cuda, device, dtype, 0)
        experts[impl] = model.model.layers[0].mlp.experts
        del model.model.layers[1:]
    first = next(iter(experts.values()))
    D, E = first.gate_up_proj.shape[2], first.gate_up_proj.shape[0]
    K = first.config.num_experts_per_tok
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_tokens, D, device=device, dtype=dtype, generator=g)
    weights, ids = torch.randn(n_tokens, E, device=device, generator=g).softmax(-1).topk(K, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    grad_out = torch.randn(n_tokens, D, device=device, dtype=dtype, generator=g)
    for impl, module in experts.items():
        leaves = [x.clone().requires_grad_(True), weights.clone().requires_grad_(True)]

        def step(module=module, leaves=leaves):
            out = module(leaves[0], ids, leaves[1])
            torch.autograd.grad(out, [*leaves, module.gate_up_proj, module.down_proj], grad_out)

        for _ in range(3):
            step()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            step()
            sync()
        print(f"\n{args.model} experts / {impl} (N={n_tokens}, D={D}, E={E}, K={K}):")
        for e in prof.events():
            if e.name in GEMM_OPS and e.device_type == torch.autograd.DeviceType.CPU:
                us = e.device_time_total if cuda else e.cpu_time_total
                shapes = " x ".join(str(tuple(s)) for s in e.input_shapes if s)
                print(f"    {us / 1e3:8.3f} ms  {e.name} {shapes}")
        per_kernel, count = profiled_times(prof, cuda)
        print(f"  {sum(per_kernel.values()) / 1e3:.3f} ms in all; by name:")
        for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:shown]:
            print(f"    {us / 1e3:8.3f} ms  x{count[name]:<3d} {name[:100]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-moe", choices=list(MODELS))
    ap.add_argument("--impl", nargs="+", default=["grouped_mm", "flashfusemoe"])
    ap.add_argument("--top", type=int, default=20, help="kernels listed per implementation")
    ap.add_argument("--experts", action="store_true", help="the first layer's experts module only")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.experts:
        return profile_experts(args, cuda, device, dtype, sync)
    for impl in args.impl:
        model = build_model(args.model, impl, not cuda, device, dtype, 0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        batch = torch.randint(3, 32768 if cuda else 128, (8, 2048) if cuda else (2, 16), device=device)
        for _ in range(2):
            step_fn(model, opt, batch)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            step_fn(model, opt, batch)
            sync()
        per_kernel, _ = profiled_times(prof, cuda)
        groups = defaultdict(float)
        for name, us in per_kernel.items():
            groups[kernel_group(name)] += us
        what = "GPU kernel time" if cuda else "CPU op time (tiny model)"
        print(f"\n{args.model} / {impl}: {what} {sum(per_kernel.values()) / 1e3:.1f} ms per step")
        for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {us / 1e3:8.1f} ms  {group}")
        for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"    {us / 1e3:8.1f} ms  {name[:100]}")
        del model, opt
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
