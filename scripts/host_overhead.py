"""Where the host time of one fused MoE step goes: enqueue time vs GPU time, and a cProfile.

    PYTHONPATH=. python scripts/host_overhead.py [--shape N D F E K] [--gemm G]
    PYTHONPATH=. python scripts/host_overhead.py --stub     # no GPU needed

On a GPU it prints the fwd+bwd time, the host's enqueue time per step and a profile. ``--stub``
runs the GPU path's Python on CPU instead: Triton's interpreter is selected (so every wrapper
takes its Triton branch) and each kernel launch is replaced by a no-op, so what is timed is the
package's own host work (checks, allocations, autograd) without the kernels. Compare two
checkouts by running it in each, one after the other, on an otherwise idle machine.
"""

import argparse
import cProfile
import os
import pstats
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=5, default=None, metavar=("N", "D", "F", "E", "K"),
                        help="default: the seed shape 8192 1024 1536 8 2 (--stub: 64 32 32 8 2)")
    parser.add_argument("--gemm", default="grouped")
    parser.add_argument("--stub", action="store_true", help="CPU, kernel launches replaced by no-ops")
    parser.add_argument("--profile", type=int, default=25, help="cProfile rows to print (0: none)")
    args = parser.parse_args()
    if args.stub:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, at import
    import torch

    import flashfusemoe
    from flashfusemoe.kernels.launch import FastLaunch
    from flashfusemoe.profiling import median_ms

    if args.stub:
        FastLaunch.launch = lambda self, grid, launch_args, kwargs: None
        torch.set_num_threads(1)
    N, D, F, E, K = args.shape or ((64, 32, 32, 8, 2) if args.stub else (8192, 1024, 1536, 8, 2))
    device, dtype = ("cpu", torch.float32) if args.stub else ("cuda", torch.bfloat16)
    mk = lambda *s, scale: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_(True)
    leaves = [mk(N, D, scale=1), mk(E, D, scale=D ** -0.5), mk(E, 2 * F, D, scale=D ** -0.5),
              mk(E, D, F, scale=F ** -0.5)]
    grad_out = torch.randn(N, D, device=device).to(dtype)

    def forward():
        return flashfusemoe.fused_moe(*leaves, K, gemm=args.gemm)

    def step():
        return torch.autograd.grad(forward(), leaves, grad_out)

    sync = (lambda: None) if args.stub else torch.cuda.synchronize
    if not args.stub:
        print(f"fwd+bwd median: {median_ms(step, warmup=5, iters=20):.3f} ms")
    for name, fn in (("forward", forward), ("fwd+bwd", step)):
        for _ in range(5):
            fn()
        sync()
        host = []
        for _ in range(20 if not args.stub else 200):
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            sync()
        print(f"host time per {name} call (median of {len(host)}): {sorted(host)[len(host) // 2]:.1f} us")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            step()
        sync()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
