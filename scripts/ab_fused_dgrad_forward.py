"""A/B of ``gemm="fused_dgrad"``'s forward, one process, alternating: the up-projection reading x by
token index with the GLU in its epilogue (``up_proj_glu``, the package's) against the laid-out x,
the grouped GEMM and a GLU pass (switched back on here by patching ``core._up_reads_by_index``).

    PYTHONPATH=. python scripts/ab_fused_dgrad_forward.py [seed mid qwen3 ...]   # a CUDA GPU

Prints per shape and variant: fwd+bwd and no-grad forward ms (median of three ``do_bench`` runs),
the peak memory of one fwd+bwd, and the largest relative difference of the gradients to the first
variant's.
"""

import statistics
import sys

import torch
import triton
from profile_layer import random_layer_inputs  # (scripts/ is on sys.path when a script runs)

import flashfusemoe
from flashfusemoe import core

SHAPES = {"seed": (8192, 1024, 1536, 8, 2), "mid": (16384, 2048, 1408, 64, 6),
          "qwen3": (16384, 2048, 768, 128, 8)}
BY_INDEX = core._up_reads_by_index
VARIANTS = {"laid-out x + grouped GEMM + GLU": lambda plan: plan.gemm == "gathered",
            "by token index": BY_INDEX}


def _relative_difference(grads, reference) -> float:
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
               for a, b in zip(grads, reference, strict=True))


def ab_shape(shape: str) -> None:
    N, D, F, E, K = SHAPES[shape]
    leaves, grad_out = random_layer_inputs(N, D, F, E)

    def fwd():
        return flashfusemoe.fused_moe(*leaves, K, gemm="fused_dgrad")

    def fwd_bwd():
        return torch.autograd.grad(fwd(), leaves, grad_out)

    results, first = {}, None
    for repeat in range(3):
        for name, rule in VARIANTS.items():
            core._up_reads_by_index = rule
            grads = fwd_bwd()
            if repeat == 0:
                first = first or grads
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd_bwd()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                results[name] = {"fwd_bwd": [], "fwd": [], "peak": peak,
                                 "diff": _relative_difference(grads, first)}
            results[name]["fwd_bwd"].append(triton.testing.do_bench(fwd_bwd, warmup=25, rep=200))
            with torch.no_grad():
                results[name]["fwd"].append(triton.testing.do_bench(fwd, warmup=25, rep=200))
    core._up_reads_by_index = BY_INDEX
    print(f"== {shape} {SHAPES[shape]}")
    for name, r in results.items():
        print(f"  {name:32s} fwd+bwd {statistics.median(r['fwd_bwd']):.3f} ms  "
              f"forward {statistics.median(r['fwd']):.3f} ms  peak {r['peak']:.0f} MiB  "
              f"gradients' relative difference {r['diff']:.1e}")


def main(shapes):
    if not torch.cuda.is_available():
        raise SystemExit("this A/B needs a CUDA GPU")
    for shape in shapes:
        ab_shape(shape)


if __name__ == "__main__":
    main(sys.argv[1:] or list(SHAPES))
