"""Public functional API: ``fused_moe``, the auxiliary losses, ``update_expert_bias`` and
``calibrate_max_tokens``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from flashfusemoe import core, ops
from flashfusemoe.config import (
    MoEOptions,
    autocast_dtype,
    check_bool,
    check_finite,
    check_has_data,
    check_int,
    make_options,
    signature_with_options,
    validate_aux_inputs,
    validate_bias_update_inputs,
    validate_inputs,
    validate_router_inputs,
)
from flashfusemoe.kernels import permute, routing


@signature_with_options
def fused_moe(x: torch.Tensor, router_weight: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              top_k: int, *, expert_bias: torch.Tensor | None = None, return_aux: bool = False,
              ep_group: Any = None, **options: Any
              ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Top-k routed GLU mixture of experts, fused.

    x [..., D]; router_weight [E, D]; w_up [E, 2F, D] (rows 0:F gate, F:2F up); w_down [E, D, F];
    expert_bias [E] fp32 (selection only). ``top_k`` and ``options``: ``MoEOptions``' fields.
    Returns ``out`` shaped like x, or ``(out, aux)`` with
    ``aux = {load_balance_loss, z_loss, tokens_per_expert [E], dropped_tokens []}``.
    Routing semantics: ``docs/design.md``. ``ep_group``: a ``torch.distributed`` process group for
    expert parallelism; w_up/w_down then hold this rank's E/W experts (``flashfusemoe.parallel``).
    """
    options = make_options(top_k, options, "fused_moe")
    return moe(x, router_weight, w_up, w_down, options, expert_bias=expert_bias, return_aux=return_aux,
               ep_group=ep_group)


def moe(x: torch.Tensor, router_weight: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
        options: MoEOptions, *, expert_bias: torch.Tensor | None = None, return_aux: bool = False,
        ep_group: Any = None) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fused_moe`` with the options already in a ``MoEOptions``.

    x [..., D]; router_weight [E, D]; w_up [E, 2F, D] (rows 0:F gate, F:2F up); w_down [E, D, F];
    expert_bias [E] float32/float64 or None (selection only). Returns ``out`` shaped like x, or with
    ``return_aux`` ``(out, aux)``: ``load_balance_loss`` [] and ``z_loss`` [] (differentiable),
    ``tokens_per_expert`` [E] int32 (before capacity) and ``dropped_tokens`` [] int32.
    Raises TypeError/ValueError naming the argument for bad tensors or options (wrong shapes,
    dtypes, devices; ``options.top_k`` > E); ``CapacityOverflowError`` with ``gemm="bmm"`` under
    ``torch.compile`` when an expert gets more than ``max_tokens_per_expert`` tokens (eager mode
    grows the layout instead). ``ep_group``: a ``torch.distributed`` process group for expert
    parallelism; w_up/w_down then hold this rank's E/W experts (``flashfusemoe.parallel``).
    """
    check_bool("return_aux", return_aux)
    if ep_group is not None:
        from flashfusemoe import parallel

        return parallel.ep_moe(x, router_weight, w_up, w_down, options, expert_bias=expert_bias,
                               group=ep_group, return_aux=return_aux)
    out, outputs = moe_outputs(x, router_weight, w_up, w_down, options, expert_bias=expert_bias)
    return (out, make_aux(outputs, options)) if return_aux else out


def moe_outputs(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None):
    """Validates, runs the fused op, returns ``(out [..., D], core.Outputs)``."""
    dtype = autocast_dtype(x)
    D, E, _ = validate_inputs(x, router_weight, w_up, w_down, expert_bias, options,
                              autocast=dtype is not None)
    check_has_data("x", x)
    if dtype is not None:
        x, router_weight = x.to(dtype), router_weight.to(dtype)
        w_up, w_down = ops.autocast_weights(dtype, w_up, w_down)  # float32 ones: cast inside the op
    lead_shape = x.shape[:-1]
    # A reshape, even to the same shape, adds an autograd node; 2-D inputs skip it.
    x2d = x.contiguous() if x.dim() == 2 else x.reshape(-1, D).contiguous()
    plan = make_plan(options, x2d.shape[0], router_weight.shape[0], D, w_down.shape[2])
    # Growing an overflowing padded layout changes residual shapes, which a traced graph can't follow.
    allow_grow = not torch.compiler.is_compiling()
    outputs = ops.moe_forward_call(
        x2d, router_weight.contiguous(), w_up.contiguous(), w_down.contiguous(), expert_bias, options,
        plan, allow_grow,
    )
    out = outputs.out if x.dim() == 2 else outputs.out.reshape(*lead_shape, D)
    return out, outputs


def make_aux(outputs: core.Outputs, options: MoEOptions) -> dict:
    """The ``aux`` dict of ``fused_moe(..., return_aux=True)``."""
    aux = _aux_losses(outputs.logits, outputs.tokens_per_expert, options.score_func)
    aux["tokens_per_expert"] = outputs.tokens_per_expert
    aux["dropped_tokens"] = outputs.dropped_tokens
    return aux


def aux_losses(logits: torch.Tensor, tokens_per_expert: torch.Tensor, score_func: str
               ) -> dict[str, torch.Tensor]:
    """Load-balance and z losses from router logits [N, E], differentiable through logits.

    ``tokens_per_expert`` [E] (integer or floating): assignments per expert, e.g.
    ``aux["tokens_per_expert"]``; ``score_func`` "softmax" | "sigmoid", as routed. Returns
    ``{"load_balance_loss": [], "z_loss": []}`` in the logits' dtype (both 0 for N = 0).
    Raises TypeError/ValueError naming the argument for non-tensors, non-floating logits,
    mismatched shapes or an unknown ``score_func``.
    """
    validate_aux_inputs(logits, tokens_per_expert, score_func)
    return _aux_losses(logits, tokens_per_expert, score_func)


def update_expert_bias(expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float
                       ) -> torch.Tensor:
    """One step of aux-loss-free load balancing (DeepSeek-V3), in place: each expert's selection
    bias moves by ``rate`` towards balance, ``expert_bias[e] += rate * sign(mean - load[e])``.

    ``expert_bias`` [E] float32/float64 (``MoELayer.expert_bias``, the ``expert_bias`` of
    ``fused_moe``); ``tokens_per_expert`` [E] integer or floating, the loads seen since the last
    update (``aux["tokens_per_expert"]``, or a sum of them); ``rate`` a float > 0. Overloaded
    experts go down by ``rate``, underloaded ones up, those exactly at the mean stay. The sign is
    taken of ``sum(load) - E * load[e]`` in float64, exact for integer loads below 2**53. No host
    sync, no autograd. Returns ``expert_bias``.
    """
    validate_bias_update_inputs(expert_bias, tokens_per_expert, rate)
    with torch.no_grad():
        loads = tokens_per_expert.to(torch.float64)
        direction = torch.sign(loads.sum() - loads.numel() * loads).to(expert_bias.dtype)
        return expert_bias.add_(direction, alpha=rate)


def _aux_losses(logits: torch.Tensor, tokens_per_expert: torch.Tensor, score_func: str) -> dict:
    N, E = logits.shape
    if N == 0:
        zero = logits.sum() * 0
        return {"load_balance_loss": zero, "z_loss": zero.clone()}
    if score_func == "softmax":
        probs = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    fraction = tokens_per_expert.to(probs.dtype) / N
    load_balance = E * (fraction * probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return {"load_balance_loss": load_balance, "z_loss": z_loss}


def make_plan(options: MoEOptions, num_tokens: int, num_experts: int, d_model: int,
              ffn_dim: int) -> core.Plan:
    """How a call runs: ``options.resolved_gemm(d_model, ffn_dim)`` and, for ``"bmm"``, the padded size
    (the capacity, ``max_tokens_per_expert``, or twice the mean load)."""
    gemm = options.resolved_gemm(d_model, ffn_dim)
    if gemm != "bmm":
        return core.Plan(gemm)
    if options.capacity_factor is not None:
        rows = min(options.capacity(num_tokens, num_experts), max(num_tokens, 1))
    elif options.max_tokens_per_expert is not None:
        rows = options.max_tokens_per_expert
    else:
        rows = options.heuristic_max_tokens(num_tokens, num_experts)
    return core.Plan("bmm", rows)


def calibrate_max_tokens(batches: Iterable[torch.Tensor], router_weight: torch.Tensor, top_k: int, *,
                         score_func: str = "softmax", norm_topk_prob: bool = True,
                         expert_bias: torch.Tensor | None = None, n_group: int | None = None,
                         topk_group: int | None = None, margin: float = 0.1, multiple: int = 8) -> int:
    """Max per-expert load over ``batches`` (each [..., D]), plus ``margin``, rounded up to ``multiple``.

    Pass the result as ``max_tokens_per_expert`` with ``gemm="bmm"``. Syncs with the host once per batch.
    """
    if isinstance(batches, torch.Tensor):  # iterating it would take its rows as batches
        raise TypeError("batches must be an iterable of tensors [..., D], got a Tensor: pass [x] for one "
                        "batch")
    check_finite("margin", margin, allow_zero=True)
    check_int("multiple", multiple, minimum=1)
    options = MoEOptions(top_k=top_k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                         n_group=n_group, topk_group=topk_group)
    peak = 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            dtype = autocast_dtype(batch)  # routed as the forward would
            D, E = validate_router_inputs(batch, router_weight, expert_bias, options, x_name=f"batches[{i}]",
                                          autocast=dtype is not None)
            check_has_data(f"batches[{i}]", batch)
            x2d, weight = batch.reshape(-1, D).contiguous(), router_weight
            if dtype is not None:
                x2d, weight = x2d.to(dtype), weight.to(dtype)
            _, topk_ids, _ = routing.route_forward(
                x2d, weight, expert_bias, top_k, score_func, norm_topk_prob, n_group, topk_group, 1.0
            )
            _, _, _, counts, _ = permute.expert_layout(topk_ids, E)
            peak = max(peak, int(counts.max()) if counts.numel() else 0)
    if peak == 0:
        raise ValueError("calibrate_max_tokens got no tokens: pass at least one non-empty batch")
    return multiple * math.ceil(peak * (1 + margin) / multiple)
