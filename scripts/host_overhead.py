"""Where the host time of one fused MoE step goes (GPU): enqueue time vs GPU time, and a cProfile.

    PYTHONPATH=. python scripts/host_overhead.py [--shape N D F E K]
"""

import argparse
import cProfile
import pstats
import time

import torch

import flashfusemoe
from flashfusemoe.profiling import median_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=5, default=[8192, 1024, 1536, 8, 2])
    args = parser.parse_args()
    N, D, F, E, K = args.shape
    mk = lambda *s, scale: (torch.randn(*s, device="cuda") * scale).bfloat16().requires_grad_(True)
    leaves = [mk(N, D, scale=1), mk(E, D, scale=D ** -0.5), mk(E, 2 * F, D, scale=D ** -0.5),
              mk(E, D, F, scale=F ** -0.5)]
    grad_out = torch.randn(N, D, device="cuda").bfloat16()

    def step():
        out = flashfusemoe.fused_moe(*leaves, K, gemm="grouped")
        return torch.autograd.grad(out, leaves, grad_out)

    print(f"fwd+bwd median: {median_ms(step, warmup=5, iters=20):.3f} ms")
    torch.cuda.synchronize()
    host = []
    for _ in range(20):
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    print(f"host enqueue time per step (median of 20): {sorted(host)[10]:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
