"""Public functional API: ``fused_moe``, the auxiliary losses and ``calibrate_max_tokens``."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from flashfusemoe import core, ops
from flashfusemoe.config import (
    MoEOptions,
    check_bool,
    check_finite,
    check_has_data,
    check_int,
    validate_aux_inputs,
    validate_inputs,
    validate_router_inputs,
)
from flashfusemoe.kernels import permute, routing

_AUTO_GEMM_CACHE: dict[tuple, str] = {}


def fused_moe(x, router_weight, w_up, w_down, top_k, *, activation="swiglu", score_func="softmax",
              norm_topk_prob=True, expert_bias=None, n_group=None, topk_group=None,
              routed_scaling_factor=1.0, capacity_factor=None, gemm="auto", max_tokens_per_expert=None,
              recompute=False, return_aux=False, ep_group=None):
    """Top-k routed GLU mixture of experts, fused.

    x [..., D]; router_weight [E, D]; w_up [E, 2F, D] (rows 0:F gate, F:2F up); w_down [E, D, F];
    expert_bias [E] fp32 (selection only). Returns ``out`` shaped like x, or ``(out, aux)`` with
    ``aux = {load_balance_loss, z_loss, tokens_per_expert [E], dropped_tokens []}``.
    Routing semantics: ``docs/design.md``. ``ep_group``: a ``torch.distributed`` process group for
    expert parallelism; w_up/w_down then hold this rank's E/W experts (``flashfusemoe.parallel``).
    """
    options = MoEOptions(
        top_k=top_k, activation=activation, score_func=score_func, norm_topk_prob=norm_topk_prob,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
        capacity_factor=capacity_factor, gemm=gemm, max_tokens_per_expert=max_tokens_per_expert,
        recompute=recompute,
    )
    return moe(x, router_weight, w_up, w_down, options, expert_bias=expert_bias, return_aux=return_aux,
               ep_group=ep_group)


def moe(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None, return_aux=False,
        ep_group=None):
    """``fused_moe`` with the options already in a ``MoEOptions``."""
    check_bool("return_aux", return_aux)
    if ep_group is not None:
        from flashfusemoe import parallel

        return parallel.ep_moe(x, router_weight, w_up, w_down, options, expert_bias=expert_bias,
                               group=ep_group, return_aux=return_aux)
    out, outputs = moe_outputs(x, router_weight, w_up, w_down, options, expert_bias=expert_bias)
    return (out, make_aux(outputs, options)) if return_aux else out


def moe_outputs(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None):
    """Validates, runs the fused op, returns ``(out [..., D], core.Outputs)``."""
    dtype = _autocast_dtype(x)
    D, E, _ = validate_inputs(x, router_weight, w_up, w_down, expert_bias, options,
                              autocast=dtype is not None)
    check_has_data("x", x)
    if dtype is not None:
        x, router_weight, w_up, w_down = (t.to(dtype) for t in (x, router_weight, w_up, w_down))
    lead_shape = x.shape[:-1]
    # A reshape, even to the same shape, adds an autograd node; 2-D inputs skip it.
    x2d = x.contiguous() if x.dim() == 2 else x.reshape(-1, D).contiguous()
    plan = make_plan(options, x2d, router_weight, w_up, w_down, expert_bias)
    # Growing an overflowing padded layout changes residual shapes, which a traced graph can't follow.
    allow_grow = not torch.compiler.is_compiling()
    outputs = ops.moe_forward_call(
        x2d, router_weight.contiguous(), w_up.contiguous(), w_down.contiguous(), expert_bias, options,
        plan, allow_grow,
    )
    out = outputs.out if x.dim() == 2 else outputs.out.reshape(*lead_shape, D)
    return out, outputs


def _autocast_dtype(x) -> torch.dtype | None:
    """The dtype torch autocast casts to on ``x``'s device, or None where it is off."""
    if not isinstance(x, torch.Tensor) or x.device.type == "meta":
        return None
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def make_aux(outputs: core.Outputs, options: MoEOptions) -> dict:
    """The ``aux`` dict of ``fused_moe(..., return_aux=True)``."""
    aux = _aux_losses(outputs.logits, outputs.tokens_per_expert, options.score_func)
    aux["tokens_per_expert"] = outputs.tokens_per_expert
    aux["dropped_tokens"] = outputs.dropped_tokens
    return aux


def aux_losses(logits: torch.Tensor, tokens_per_expert: torch.Tensor, score_func: str) -> dict:
    """Load-balance and z losses from router logits [N, E] (differentiable through logits)."""
    validate_aux_inputs(logits, tokens_per_expert, score_func)
    return _aux_losses(logits, tokens_per_expert, score_func)


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


def make_plan(options: MoEOptions, x2d, router_weight, w_up, w_down, expert_bias) -> core.Plan:
    """Resolves ``gemm`` ("auto" measured once per shape on CUDA) and the padded layout size."""
    N, E = x2d.shape[0], router_weight.shape[0]
    gemm = options.gemm
    if gemm == "auto":
        gemm = _auto_gemm(options, x2d, router_weight, w_up, w_down, expert_bias)
    if gemm == "grouped":
        return core.Plan("grouped")
    if options.capacity_factor is not None:
        rows = min(options.capacity(N, E), max(N, 1))
    elif options.max_tokens_per_expert is not None:
        rows = options.max_tokens_per_expert
    else:
        rows = options.heuristic_max_tokens(N, E)
    return core.Plan("bmm", rows)


def _auto_gemm(options, x2d, router_weight, w_up, w_down, expert_bias) -> str:
    """"grouped" unless a one-off CUDA timing of this shape finds the padded bmm layout faster."""
    if not x2d.is_cuda or x2d.shape[0] == 0:
        return "grouped"
    key = (x2d.device, x2d.dtype, tuple(x2d.shape), tuple(w_up.shape), options)
    if key in _AUTO_GEMM_CACHE:
        return _AUTO_GEMM_CACHE[key]
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "grouped"
    times = {}
    with torch.no_grad():
        for gemm in ("grouped", "bmm"):
            opts = MoEOptions(**{**options.__dict__, "gemm": gemm})
            plan = make_plan(opts, x2d, router_weight, w_up, w_down, expert_bias)
            run = lambda: core.forward(x2d, router_weight, w_up, w_down, expert_bias, opts, plan,  # noqa: B023
                                       allow_grow=True)
            run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                run()
            end.record()
            end.synchronize()
            times[gemm] = start.elapsed_time(end)
    _AUTO_GEMM_CACHE[key] = min(times, key=times.get)
    return _AUTO_GEMM_CACHE[key]


def calibrate_max_tokens(batches: Iterable[torch.Tensor], router_weight, top_k, *, score_func="softmax",
                         norm_topk_prob=True, expert_bias=None, n_group=None, topk_group=None,
                         margin=0.1, multiple=8) -> int:
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
            dtype = _autocast_dtype(batch)  # routed as the forward would
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
