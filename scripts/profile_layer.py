"""Per-kernel breakdown of one fused MoE forward and backward on the GPU (names, count, time).

    PYTHONPATH=. python scripts/profile_layer.py [--shape N D F E K] [--gemm grouped]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import flashfusemoe


def _table(prof, title):
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in events)
    print(f"\n{title}: {len(events)} launches, {total / 1e3:.3f} ms of kernel time")
    for e in events:
        print(f"  {e.device_time:9.1f} us  {e.name[:110]}")


def random_layer_inputs(N, D, F, E, seed=0):
    """bf16 CUDA leaves ``[x, router_weight, w_up, w_down]`` at unit-variance scales, and a
    ``grad_out [N, D]``."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def leaf(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16().requires_grad_(True)

    leaves = [leaf(N, D, scale=1), leaf(E, D, scale=D ** -0.5), leaf(E, 2 * F, D, scale=D ** -0.5),
              leaf(E, D, F, scale=F ** -0.5)]
    return leaves, torch.randn(N, D, device="cuda", generator=g).bfloat16()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=5, default=[8192, 1024, 1536, 8, 2])
    parser.add_argument("--gemm", default="grouped")
    args = parser.parse_args()
    N, D, F, E, K = args.shape
    leaves, grad_out = random_layer_inputs(N, D, F, E)
    fn = lambda: flashfusemoe.fused_moe(*leaves, K, gemm=args.gemm)
    for _ in range(3):
        torch.autograd.grad(fn(), leaves, grad_out)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    _table(prof, "forward")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(out, leaves, grad_out)
        torch.cuda.synchronize()
    _table(prof, "backward")


if __name__ == "__main__":
    main()
