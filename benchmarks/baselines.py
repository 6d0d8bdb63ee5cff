"""Baselines written with plain torch ops, for the benchmarks.

``grouped_mm_moe`` is the approach torchtitan takes: softmax top-k routing, an argsort
permutation, an index gather, ``torch._grouped_mm`` for the up and down projections (int32
offsets from a cumulative sum of per-expert counts), the activation as torch ops, and an
``index_add`` combine. Every op is sync-free on CUDA (counts come from ``scatter_add_``, not
``torch.bincount``), so it is the strongest "no custom kernels" baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(g)
    if activation == "geglu":
        return F.gelu(g)
    if activation == "relu2":
        return F.relu(g).square()
    raise ValueError(f"unknown activation {activation!r}")


def grouped_mm_moe(x, router_weight, w_up, w_down, top_k: int, *, activation: str = "swiglu"):
    """Dropless top-k MoE on ``torch._grouped_mm``: ``x [..., D] -> [..., D]`` (x's dtype).

    router_weight [E, D]; w_up [E, 2F, D] (rows 0:F gate, F:2F up); w_down [E, D, F].
    Routing: ``softmax(x @ router_weight.T)`` in fp32 (the logits GEMM runs in x's dtype),
    ``topk``, weights normalised to sum 1. The combine accumulates in fp32. Differentiable
    through every input by autograd. On CUDA the grouped GEMMs need bf16 and 16-byte aligned
    rows (D and F multiples of 8).
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    shape, D = x.shape, x.shape[-1]
    E, F2 = router_weight.shape[0], w_up.shape[1]
    Fh = F2 // 2
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, E={E}]")
    x2 = x.reshape(-1, D)
    N = x2.shape[0]

    logits = (x2 @ router_weight.t()).float()  # [N, E]
    scores = torch.softmax(logits, dim=-1)
    topk_w, topk_ids = scores.topk(top_k, dim=-1)  # [N, K]
    topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)

    flat_ids = topk_ids.reshape(-1)  # assignment a = n*K + k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert
    order = flat_ids.argsort(stable=True)  # row -> assignment
    token = order // top_k  # row -> token

    xs = x2.index_select(0, token)  # [A, D]
    h = torch._grouped_mm(xs, w_up.transpose(-2, -1), offs=offs)  # [A, 2F]
    a = _act(h[:, :Fh], activation) * h[:, Fh:]
    y = torch._grouped_mm(a, w_down.transpose(-2, -1), offs=offs)  # [A, D]
    w_rows = topk_w.reshape(-1).index_select(0, order)  # [A] fp32
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    out = out.index_add(0, token, y.float() * w_rows[:, None])
    return out.to(x.dtype).reshape(shape)
