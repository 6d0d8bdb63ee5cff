"""The main demo: the fused layer next to the unfused reference on this machine.

    python -m flashfusemoe.demo            # seed shape on a GPU, a small shape on CPU

Prints the max relative error of the output and of every gradient against a float32 (GPU)
or float64 (CPU) reference, the fwd+bwd time of each, and on GPU the kernel launches.
``make demo`` then runs ``python -m jax_bridge.demo``, the same comparison through JAX.
"""

from __future__ import annotations

import argparse
import math

import torch

import flashfusemoe
from flashfusemoe.config import GEMMS
from flashfusemoe.profiling import count_cuda_kernels, median_ms
from flashfusemoe.reference import moe_reference

NAMES = ("out", "grad_x", "grad_router", "grad_w_up", "grad_w_down")


def _inputs(N, D, F, E, dtype, device, gen):
    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    return [rnd(N, D, scale=1.0), rnd(E, D, scale=D ** -0.5), rnd(E, 2 * F, D, scale=D ** -0.5),
            rnd(E, D, F, scale=F ** -0.5)]


def _fwd_bwd(fn, tensors, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out.detach(), *grads]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, metavar=("N", "D", "F", "E", "K"), default=None)
    parser.add_argument("--gemm", default="grouped", choices=GEMMS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    N, D, F, E, K = args.shape or ((8192, 1024, 1536, 8, 2) if cuda else (256, 64, 96, 8, 2))
    dtype = torch.bfloat16 if cuda else torch.float32
    truth_dtype = torch.float32 if cuda else torch.float64
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = _inputs(N, D, F, E, dtype, device, gen)
    grad_out = torch.randn(N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    print(f"FlashFuseMoE demo on {torch.cuda.get_device_name() if cuda else 'CPU'}: "
          f"N={N} D={D} F={F} E={E} top_k={K}, {dtype}, gemm={args.gemm}")

    fused = lambda *t: flashfusemoe.fused_moe(*t, K, gemm=args.gemm)
    reference = lambda *t: moe_reference(*t, K)
    truth = _fwd_bwd(reference, [t.to(truth_dtype) for t in tensors], grad_out.to(truth_dtype))
    rows = {"flashfusemoe": fused, "moe_reference": reference}
    results = {name: _fwd_bwd(fn, tensors, grad_out) for name, fn in rows.items()}

    print(f"\nmax relative error against moe_reference in {truth_dtype}:")
    print(f"{'':>16}" + "".join(f"{n:>14}" for n in NAMES))
    for name, res in results.items():
        print(f"{name:>16}" + "".join(f"{_rel(a, b):>14.2e}" for a, b in zip(res, truth)))

    print("\nforward+backward time:")
    times = {name: median_ms(lambda fn=fn: _fwd_bwd(fn, tensors, grad_out)) for name, fn in rows.items()}
    for name, ms in times.items():
        print(f"{name:>16}: {ms:9.3f} ms")
    print(f"{'speed-up':>16}: {times['moe_reference'] / times['flashfusemoe']:9.2f}x")

    if cuda:
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        fwd = count_cuda_kernels(lambda: fused(*leaves))
        out = fused(*leaves)
        bwd = count_cuda_kernels(lambda: torch.autograd.grad(out, leaves, grad_out))
        print(f"\nkernel launches per layer: forward {fwd}, backward {bwd} (router GEMM included)")
    worst = max(_rel(a, b) for a, b in zip(results["flashfusemoe"], truth))
    bound = 5e-2 if dtype == torch.bfloat16 else 1e-4
    if not math.isfinite(worst) or worst > bound:
        raise SystemExit(f"FAILED: max relative error {worst:.2e} > {bound}")
    print(f"\nOK: max relative error {worst:.2e} <= {bound}")


if __name__ == "__main__":
    main()
