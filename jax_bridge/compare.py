"""Cross-framework comparison: one MoE config through four implementations.

    python -m jax_bridge.compare                  # GPU: the seed shape in bf16; CPU: a small f32 shape
    python -m jax_bridge.compare --shape 512 64 96 8 2 --dtype bf16 --activation geglu --expert-bias

The same inputs, weights and output gradient go through torch-native ``flashfusemoe.fused_moe``,
the JAX bridge ``jax_bridge.fused_moe`` (under ``jax.jit``), the pure-JAX
``jax_bridge.reference.moe_reference`` and the torch ``flashfusemoe.reference.moe_reference``.
The table gives the max abs and the relative difference (``max|a - b| / max|b|``) of the output
and of the gradients of x, router_weight, w_up and w_down, for each implementation against the
torch reference, for the bridge against the pure-JAX reference, and for the bridge against
torch-native. Bounds: bridge vs torch-native bit-identical; against a reference, relative
difference < 1e-5 in f32 and < 1e-2 in bf16. The torch reference runs in float32 for bf16 inputs
(``--reference-dtype`` changes it), so it measures the same thing as the pure-JAX reference,
which computes in float32. Exit status: 0 when every bound holds, 1 otherwise.
"""

from __future__ import annotations

import os

# torch and JAX share the GPU here: without this JAX would take 75% of its memory on first use.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import flashfusemoe  # noqa: E402
from flashfusemoe.config import ACTIVATIONS, GEMMS, SCORE_FUNCS  # noqa: E402
from flashfusemoe.reference import moe_reference as torch_reference  # noqa: E402
from jax_bridge import callback  # noqa: E402
from jax_bridge.convert import torch_to_numpy  # noqa: E402
from jax_bridge.ops import fused_moe as bridge_fused_moe  # noqa: E402
from jax_bridge.reference import moe_reference as jax_reference  # noqa: E402

QUANTITIES = ("out", "grad_x", "grad_router_weight", "grad_w_up", "grad_w_down")
REL_BOUND = {"f32": 1e-5, "bf16": 1e-2}
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}
GPU_DEFAULT_SHAPE = (8192, 1024, 1536, 8, 2)
CPU_DEFAULT_SHAPE = (256, 64, 96, 8, 2)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jax_bridge.compare", description=__doc__.splitlines()[0])
    p.add_argument(
        "--shape",
        type=int,
        nargs=5,
        metavar=("N", "D", "F", "E", "K"),
        default=None,
        help=f"default {GPU_DEFAULT_SHAPE} on GPU, {CPU_DEFAULT_SHAPE} on CPU",
    )
    p.add_argument("--dtype", choices=("f32", "bf16"), default=None, help="default bf16 on GPU, f32 on CPU")
    p.add_argument(
        "--reference-dtype",
        choices=("f32", "f64"),
        default="f32",
        help="dtype the torch reference computes in (default f32)",
    )
    p.add_argument("--activation", choices=ACTIVATIONS, default="swiglu")
    p.add_argument("--score-func", choices=SCORE_FUNCS, default="softmax")
    p.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false")
    p.add_argument("--expert-bias", action="store_true", help="a random fp32 selection bias [E]")
    p.add_argument("--n-group", type=int, default=None)
    p.add_argument("--topk-group", type=int, default=None)
    p.add_argument("--routed-scaling-factor", type=float, default=1.0)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument(
        "--gemm",
        choices=GEMMS,
        default="grouped",
        help="default grouped; with auto, torch-native may pick bmm by timing on a GPU while the "
        "bridge always runs grouped, and the two stop being comparable bit for bit",
    )
    p.add_argument("--max-tokens-per-expert", type=int, default=None)
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(N, D, F, E, seed, with_bias):
    """Float32 host tensors: x, router_weight, w_up, w_down, grad_out, expert_bias (or None)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale: torch.randn(*shape, generator=gen) * scale
    tensors = [
        rnd(N, D, scale=1.0),
        rnd(E, D, scale=D**-0.5),
        rnd(E, 2 * F, D, scale=D**-0.5),
        rnd(E, D, F, scale=F**-0.5),
        rnd(N, D, scale=1.0),
    ]
    bias = rnd(E, scale=0.5 / E) if with_bias else None
    return tensors, bias


def run_torch(fn, tensors, grad_out):
    """``[out, grad_x, grad_router_weight, grad_w_up, grad_w_down]`` as host arrays."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [torch_to_numpy(t) for t in (out, *grads)]


def run_jax(fn, arrays, grad_out):
    """Forward and backward under ``jax.jit``; same return as ``run_torch``."""

    def fwd_bwd(arrays, grad_out):
        out, pullback = jax.vjp(fn, *arrays)
        return [out, *pullback(grad_out)]

    return [np.asarray(a) for a in jax.jit(fwd_bwd)(arrays, grad_out)]


def _diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    abs_diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return abs_diff, abs_diff / max(scale, 1e-30)


def _bit_identical(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def compare(results: dict, dtype: str) -> list[tuple]:
    """Rows ``(pair, quantity, max_abs, rel, bound, ok)`` of the comparison table."""
    pairs = [
        ("torch-native", "torch-ref"),
        ("bridge", "torch-ref"),
        ("jax-ref", "torch-ref"),
        ("bridge", "jax-ref"),
        ("bridge", "torch-native"),
    ]
    rows = []
    for a, b in pairs:
        for i, quantity in enumerate(QUANTITIES):
            abs_diff, rel = _diff(results[a][i], results[b][i])
            if b == "torch-native":
                bound, ok = "bit-identical", _bit_identical(results[a][i], results[b][i])
            else:
                bound, ok = f"rel < {REL_BOUND[dtype]:g}", bool(rel < REL_BOUND[dtype])
            rows.append((f"{a} vs {b}", quantity, abs_diff, rel, bound, ok))
    return rows


def print_table(rows) -> None:
    print(f"{'pair':<26}{'quantity':<20}{'max abs':>12}{'rel':>12}  {'bound':<15}ok")
    for pair, quantity, abs_diff, rel, bound, ok in rows:
        print(f"{pair:<26}{quantity:<20}{abs_diff:>12.3e}{rel:>12.3e}  {bound:<15}{'yes' if ok else 'NO'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("JAX runs on the GPU but this torch build has no CUDA: the bridge needs both")
    if not on_gpu and torch.cuda.is_available():
        print("note: JAX has no GPU backend here, so everything runs on the CPU", file=sys.stderr)
    device = "cuda" if on_gpu else "cpu"
    N, D, F, E, K = args.shape or (GPU_DEFAULT_SHAPE if on_gpu else CPU_DEFAULT_SHAPE)
    dtype = args.dtype or ("bf16" if on_gpu else "f32")
    options = dict(
        activation=args.activation,
        score_func=args.score_func,
        norm_topk_prob=args.norm_topk_prob,
        n_group=args.n_group,
        topk_group=args.topk_group,
        routed_scaling_factor=args.routed_scaling_factor,
        capacity_factor=args.capacity_factor,
    )
    fused_options = dict(
        options, gemm=args.gemm, max_tokens_per_expert=args.max_tokens_per_expert, recompute=args.recompute
    )
    # Same bad options, same errors: let flashfusemoe reject them before anything runs.
    flashfusemoe.MoEOptions(top_k=K, **fused_options).check_num_experts(E)

    host, bias = make_inputs(N, D, F, E, args.seed, args.expert_bias)
    tdt, rdt = TORCH_DTYPES[dtype], TORCH_DTYPES[args.reference_dtype]
    tensors = [t.to(tdt).to(device) for t in host]  # one rounding, shared by every implementation
    bias_t = None if bias is None else bias.to(device)
    arrays = [jnp.asarray(torch_to_numpy(t)) for t in tensors]
    bias_j = None if bias is None else jnp.asarray(torch_to_numpy(bias))
    print(
        f"jax_bridge.compare on {device} ({jax.devices()[0].device_kind}): N={N} D={D} F={F} E={E} "
        f"top_k={K}, {dtype}, torch reference in {args.reference_dtype}, "
        + ", ".join(f"{k}={v}" for k, v in fused_options.items())
        + f", expert_bias={'random' if bias is not None else None}"
        + f", custom call: {callback.custom_call_name()}"
    )

    runs = {
        "torch-native": lambda: run_torch(
            lambda *t: flashfusemoe.fused_moe(*t, K, expert_bias=bias_t, **fused_options),
            tensors[:4],
            tensors[4],
        ),
        "bridge": lambda: run_jax(
            lambda *a: bridge_fused_moe(*a, K, expert_bias=bias_j, **fused_options), arrays[:4], arrays[4]
        ),
        "jax-ref": lambda: run_jax(
            lambda *a: jax_reference(*a, K, expert_bias=bias_j, **options), arrays[:4], arrays[4]
        ),
        "torch-ref": lambda: run_torch(
            lambda *t: torch_reference(*t, K, expert_bias=bias_t, **options),
            [t.to(rdt) for t in tensors[:4]],
            tensors[4].to(rdt),
        ),
    }
    results = {}
    for name, run in runs.items():
        start = time.perf_counter()
        results[name] = run()
        print(f"  {name:<13} {time.perf_counter() - start:7.2f} s (first call, compilation included)")
    rows = compare(results, dtype)
    print_table(rows)
    failed = [r for r in rows if not r[-1]]
    print(f"{'FAIL' if failed else 'PASS'}: {len(rows) - len(failed)}/{len(rows)} bounds hold")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
