"""``moe_experts`` fwd+bwd with ``gemm="grouped"`` against ``gemm="gathered"``, per expert shape.

    PYTHONPATH=. python scripts/bench_experts.py [--shapes qwen3 f1024 mixtral fine]

bf16 on one GPU, softmax top-k routing of random logits, ``triton.testing.do_bench`` (median ms)
of one ``moe_experts`` forward plus ``torch.autograd.grad`` of all four inputs; TFLOP/s counts
the expert GEMMs (3 x 2 x N*K x D x 3F). The ratio decides where ``gemm="auto"`` switches
(``flashfusemoe.config.GATHERED_MAX_FFN``). On CPU it runs tiny float32 shapes (a smoke run).
"""

import argparse
import functools
import math

import torch

from flashfusemoe import moe_experts
from flashfusemoe.profiling import median_ms

SHAPES = {  # N, D, F, E, K
    "qwen3": (16384, 2048, 768, 128, 8),  # benchmarks.hf's Qwen3-MoE-shaped layer
    "f1024": (16384, 2048, 1024, 128, 8),
    "mixtral": (16384, 4096, 14336, 8, 2),  # benchmarks.hf's Mixtral-shaped layer
    "fine": (24576, 1536, 256, 128, 8),
}


def _step(leaves, ids, grad_out, gemm):
    x, weights, w_up, w_down = leaves
    out = moe_experts(x, ids, weights, w_up, w_down, gemm=gemm, check_ids=False, distinct_ids=True)
    torch.autograd.grad(out, leaves, grad_out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        from triton.testing import do_bench
    else:  # one timed call after one warm-up (a smoke run)
        def do_bench(fn, **_):
            return median_ms(fn, warmup=1, iters=1)
    for name in args.shapes:
        N, D, F, E, K = SHAPES[name] if cuda else (64, 32, 16, 8, 2)
        torch.manual_seed(0)
        x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
        weights, ids = torch.randn(N, E, device=device).softmax(-1).topk(K, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).requires_grad_(True)
        w_up = (torch.randn(E, 2 * F, D, device=device) / math.sqrt(D)).to(dtype).requires_grad_(True)
        w_down = (torch.randn(E, D, F, device=device) / math.sqrt(F)).to(dtype).requires_grad_(True)
        grad_out = torch.randn(N, D, device=device, dtype=dtype)
        flops = 3 * 2 * N * K * D * 3 * F
        ms = {}
        leaves = (x, weights, w_up, w_down)
        for gemm in ("grouped", "gathered"):
            step = functools.partial(_step, leaves, ids, grad_out, gemm)
            ms[gemm] = do_bench(step, warmup=10, rep=150)
            tflops = flops / ms[gemm] / 1e9
            print(f"{name:8s} {gemm:9s} fwd+bwd {ms[gemm]:8.3f} ms  {tflops:6.0f} TFLOP/s", flush=True)
        print(f"{name:8s} gathered/grouped {ms['gathered'] / ms['grouped']:.3f}", flush=True)


if __name__ == "__main__":
    main()
