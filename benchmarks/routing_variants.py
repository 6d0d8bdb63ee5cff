"""Forward+backward time of each routing variant relative to default softmax routing (GPU, bf16).

Each step is timed twice: as called from Python (host overhead included) and replayed as a
CUDA graph (device time only, the steady state under CUDA graphs or a fast host).

    PYTHONPATH=. python -m benchmarks.routing_variants [--shape N D F E K]
"""

from __future__ import annotations

import argparse

import torch

import flashfusemoe
from flashfusemoe.profiling import graph_median_ms, median_ms

VARIANTS = {
    "softmax (default)": {},
    "softmax, no norm": dict(norm_topk_prob=False),
    "softmax + expert_bias": dict(expert_bias=True),
    "sigmoid": dict(score_func="sigmoid"),
    "sigmoid + bias + groups + scale": dict(score_func="sigmoid", expert_bias=True, n_group=4, topk_group=2,
                                            routed_scaling_factor=2.5),
    "softmax + groups": dict(n_group=2, topk_group=1),
    "capacity 1.25": dict(capacity_factor=1.25),
    "z/load-balance aux losses": dict(return_aux=True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[8192, 1024, 1536, 8, 2])
    args = parser.parse_args(argv)
    N, D, F, E, K = args.shape
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale):
        t = torch.randn(*shape, device=device, generator=g, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(True)

    leaves = [rnd(N, D, scale=1), rnd(E, D, scale=D ** -0.5), rnd(E, 2 * F, D, scale=D ** -0.5),
              rnd(E, D, F, scale=F ** -0.5)]
    grad_out = torch.randn(N, D, device=device, generator=g).to(dtype)
    bias = 0.01 * torch.randn(E, device=device, generator=g)
    print(f"routing variants, fwd+bwd, N={N} D={D} F={F} E={E} K={K}, {dtype}, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}")
    base = None
    for name, opts in VARIANTS.items():
        opts = dict(opts)
        if opts.pop("expert_bias", False):
            opts["expert_bias"] = bias
        aux = opts.pop("return_aux", False)

        def step(opts=opts, aux=aux):
            res = flashfusemoe.fused_moe(*leaves, K, gemm="grouped", return_aux=aux, **opts)
            loss = (res[0].float() * grad_out.float()).sum() if aux else None
            if aux:
                loss = loss + res[1]["load_balance_loss"] + res[1]["z_loss"]
                return torch.autograd.grad(loss, leaves)
            return torch.autograd.grad(res, leaves, grad_out)

        ms = median_ms(step, warmup=5, iters=30)
        graph_ms = graph_median_ms(step) if cuda else ms
        base = base or (ms, graph_ms)
        print(f"  {name:34s} eager {ms:8.3f} ms {ms / base[0]:5.2f}x   "
              f"CUDA graph {graph_ms:8.3f} ms {graph_ms / base[1]:5.2f}x of default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
