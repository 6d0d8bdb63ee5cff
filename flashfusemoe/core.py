"""The functional core: ``forward(...) -> (outputs, residuals)`` and ``backward(...) -> grads``.

No autograd state lives here. The torch ``custom_op`` (``flashfusemoe.ops``) and the JAX
``custom_vjp`` (``jax_bridge``) both call these two functions, which is what keeps the two
frameworks bit-identical. Every residual's shape follows from the inputs and the ``Plan``.
See ``docs/design.md`` for the layout and the launch sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from flashfusemoe.config import MoEOptions
from flashfusemoe.kernels import activation, compute_dtype, fits_output, grouped_gemm, permute, routing


class CapacityOverflowError(RuntimeError):
    """An expert received more tokens than the padded ``gemm="bmm"`` layout holds."""


@dataclass(frozen=True)
class Plan:
    """How a call lays out rows: ``gemm`` is "grouped" (dropless, R = N*K) or "bmm" (R = E*M)."""

    gemm: str
    rows_per_expert: int = 0  # M of the padded layout; 0 for grouped

    def num_rows(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        return self.rows_per_expert * num_experts if self.gemm == "bmm" else num_tokens * top_k


class Outputs(NamedTuple):
    out: torch.Tensor  # [N, D], x.dtype
    logits: torch.Tensor  # [N, E], routing dtype; differentiable (aux losses)
    tokens_per_expert: torch.Tensor  # [E] int32, after top-k, before capacity
    dropped_tokens: torch.Tensor  # [] int32, dropped assignments


class Residuals(NamedTuple):
    topk_ids: torch.Tensor  # [N, K] int32
    topk_weights: torch.Tensor  # [N, K] routing dtype
    assign_to_row: torch.Tensor  # [N*K] int32
    row_to_assign: torch.Tensor  # [R] int32
    expert_ends: torch.Tensor  # [E] int32
    h: torch.Tensor  # [R, 2F] pre-activation; [0, 2F] when recompute=True


def result_specs(num_tokens: int, d_model: int, num_experts: int, two_f: int, options: MoEOptions,
                 plan: Plan) -> tuple[tuple[tuple[int, ...], str], ...]:
    """``(shape, dtype)`` of each of ``forward``'s ``(*Outputs, *Residuals)``, for tracing.

    The dtype is named: ``"input"`` (x's), ``"route"`` (the routing dtype, ``compute_dtype`` of
    x's) or ``"int32"``.
    """
    N, D, E, K = num_tokens, d_model, num_experts, options.top_k
    R = plan.num_rows(N, K, E)
    return (
        ((N, D), "input"),
        ((N, E), "route"),
        ((E,), "int32"),
        ((), "int32"),
        ((N, K), "int32"),
        ((N, K), "route"),
        ((N * K,), "int32"),
        ((R,), "int32"),
        ((E,), "int32"),
        ((0 if options.recompute else R, two_f), "input"),
    )


def _expert_mm(a, b, expert_ends, plan: Plan, trans_b: bool):
    """Per-expert ``a_e @ b[e].T`` (trans_b) or ``a_e @ b[e]``. a [R, K] -> [R, Nout]."""
    if plan.gemm == "bmm":
        E = b.shape[0]
        a3 = a.view(E, plan.rows_per_expert, a.shape[1])
        n_out = b.shape[1] if trans_b else b.shape[2]  # (not -1: the layout may have 0 rows)
        return torch.bmm(a3, b.transpose(1, 2) if trans_b else b).view(a.shape[0], n_out)
    return grouped_gemm.grouped_mm(a, b, expert_ends, trans_b)


def _expert_weight_grad(a, b, expert_ends, plan: Plan, num_experts: int, out=None):
    """Per-expert ``a_e.T @ b_e``: a [R, M], b [R, Nout] -> [E, M, Nout] (zeros for empty experts),
    written into ``out`` when given."""
    if plan.gemm == "bmm":
        M = plan.rows_per_expert
        a3, b3 = a.view(num_experts, M, a.shape[1]), b.view(num_experts, M, b.shape[1])
        return torch.bmm(a3.transpose(1, 2), b3, out=out)
    return grouped_gemm.grouped_mm_weight_grad(a, b, expert_ends, out=out)


def _layout(topk_ids, topk_weights, num_experts, plan: Plan, options: MoEOptions):
    keep = None
    if options.capacity_factor is not None:
        capacity = options.capacity(topk_ids.shape[0], num_experts)
        keep = permute.capacity_keep(topk_ids, topk_weights, num_experts, capacity)
    return permute.expert_layout(topk_ids, num_experts, plan.rows_per_expert, keep)


def _destination(into, index: int, shape, like: torch.Tensor, dtype: torch.dtype):
    """``into[index]`` if it can take a ``shape`` result of ``dtype`` on ``like``'s device in place."""
    t = None if into is None else into[index]
    return t if t is not None and fits_output(t, shape, dtype, like.device) else None


def forward(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions, plan: Plan, *,
            allow_grow: bool = False, into=None) -> tuple[Outputs, Residuals, Plan]:
    """Fused MoE forward.

    x [N, D]; router_weight [E, D]; w_up [E, 2F, D]; w_down [E, D, F]; expert_bias [E] or None.
    Returns the outputs, the residuals backward needs, and the plan actually used: with
    ``gemm="bmm"`` an overflow of the padded layout grows it (one host sync) when
    ``allow_grow``, and raises ``CapacityOverflowError`` otherwise. Capacity mode never overflows.
    ``into``: destinations by index of ``(*Outputs, *Residuals)`` (None entries allowed, e.g. the
    JAX bridge's output buffers): the kernels that produce a result write it there when it fits
    (the routing outputs, the dropless layout's maps, ``h`` and ``out``), and it is returned as
    that tensor.
    """
    N, K = x.shape[0], options.top_k
    E = router_weight.shape[0]
    route_dtype, i32 = compute_dtype(x.dtype), torch.int32
    route_args = (x, router_weight, expert_bias, K, options.score_func, options.norm_topk_prob,
                  options.n_group, options.topk_group, float(options.routed_scaling_factor))
    route_into = None if into is None else (_destination(into, 1, (N, E), x, route_dtype),
                                            _destination(into, 4, (N, K), x, i32),
                                            _destination(into, 5, (N, K), x, route_dtype))
    if plan.gemm == "grouped":
        # Default path: the routing kernel counts tokens per block and expert, so the layout and
        # the row gather take one launch. Capacity then drops rows in place (zeros, -1 maps).
        logits, topk_ids, topk_weights, block_counts, block_n = routing.route_forward(
            *route_args, with_block_counts=True, out=route_into)
        layout_into = None
        if into is not None:
            dropped = _destination(into, 3, (), x, i32)
            layout_into = (_destination(into, 6, (N * K,), x, i32), _destination(into, 7, (N * K,), x, i32),
                           _destination(into, 8, (E,), x, i32), _destination(into, 2, (E,), x, i32),
                           None if dropped is None else dropped.view(1))
        x_sorted, assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = (
            permute.layout_and_gather(x, topk_ids, E, block_counts, block_n, out=layout_into))
        if options.capacity_factor is not None:
            num_unplaced = permute.capacity_drop(x_sorted, topk_weights, assign_to_row, row_to_assign,
                                                 expert_ends, options.capacity(x.shape[0], E))
    else:
        logits, topk_ids, topk_weights = routing.route_forward(*route_args, out=route_into)
        assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = _layout(
            topk_ids, topk_weights, E, plan, options)
        if plan.gemm == "bmm" and options.capacity_factor is None and x.shape[0] > 0:
            overflow = int(num_unplaced.sum())  # the padded layout needs this host sync
            if overflow:
                needed = int(tokens_per_expert.max())
                if not allow_grow:
                    raise CapacityOverflowError(
                        f"gemm='bmm': an expert received {needed} tokens but max_tokens_per_expert is "
                        f"{plan.rows_per_expert} ({overflow} assignments overflow). Pass a larger "
                        "max_tokens_per_expert (see calibrate_max_tokens) or use gemm='grouped'."
                    )
                plan = Plan("bmm", needed)
                assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = _layout(
                    topk_ids, topk_weights, E, plan, options)
        x_sorted = permute.gather_rows(x, row_to_assign, K)
    h = _expert_mm(x_sorted, w_up, expert_ends, plan, trans_b=True)
    h_into = None if options.recompute else _destination(into, 9, h.shape, h, h.dtype)
    a = activation.glu_forward(h, options.activation, h_copy=h_into)
    if h_into is not None:
        h = h_into
    y = _expert_mm(a, w_down, expert_ends, plan, trans_b=True)
    out = permute.combine_rows(y, assign_to_row, K, weights=topk_weights, out_dtype=x.dtype,
                               out=_destination(into, 0, x.shape, x, x.dtype))
    if options.recompute:
        h = h.new_empty((0, h.shape[1]))
    outputs = Outputs(out, logits, tokens_per_expert, num_unplaced.reshape(()))
    residuals = Residuals(topk_ids, topk_weights, assign_to_row, row_to_assign, expert_ends, h)
    return outputs, residuals, plan


def backward(x, router_weight, w_up, w_down, logits, residuals: Residuals, grad_out, grad_logits,
             options: MoEOptions, plan: Plan, *, into=None):
    """Fused MoE backward.

    grad_out [N, D] (or None); grad_logits [N, E] from aux losses (or None).
    Returns ``(grad_x [N, D], grad_router_weight [E, D], grad_w_up [E, 2F, D], grad_w_down [E, D, F])``,
    each written ``into`` its given destination, as in ``forward`` (the expert weight gradients
    in place where their GEMM can write there: the TMA kernel or ``torch.bmm``, else copied).
    """
    K = options.top_k
    E = router_weight.shape[0]
    r = residuals
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if plan.gemm == "grouped" and options.capacity_factor is None:  # every row has its assignment
        x_sorted, dy = permute.scatter_rows(x, r.assign_to_row, K, second=grad_out)
    else:
        x_sorted, dy = permute.gather_rows(x, r.row_to_assign, K, second=grad_out)
    h = _expert_mm(x_sorted, w_up, r.expert_ends, plan, trans_b=True) if options.recompute else r.h
    da = _expert_mm(dy, w_down, r.expert_ends, plan, trans_b=False)
    dh, a_weighted, grad_w_row = activation.glu_backward(
        h, da, options.activation, r.row_to_assign, r.topk_weights
    )
    grad_w_down = _expert_weight_grad(dy, a_weighted, r.expert_ends, plan, E,
                                      out=_destination(into, 3, w_down.shape, x, x.dtype))
    dx_sorted = _expert_mm(dh, w_up, r.expert_ends, plan, trans_b=False)
    grad_w_up = _expert_weight_grad(dh, x_sorted, r.expert_ends, plan, E,
                                    out=_destination(into, 2, w_up.shape, x, x.dtype))
    # grad_logits in x's dtype feeds the router's two GEMMs (its term of grad_x, in the combine,
    # and the router-weight gradient) with fp32 accumulation, as an autocast linear layer would.
    grad_logits = routing.route_backward(
        logits, r.topk_ids, grad_w_row, r.assign_to_row, grad_logits, options.score_func,
        options.norm_topk_prob, float(options.routed_scaling_factor), out_dtype=x.dtype,
    )
    grad_x = permute.combine_rows(dx_sorted, r.assign_to_row, K, logit_grad=grad_logits,
                                  router_weight=router_weight, out_dtype=x.dtype,
                                  out=_destination(into, 0, x.shape, x, x.dtype))
    grad_router_into = _destination(into, 1, router_weight.shape, x, x.dtype)
    if grad_router_into is None:
        grad_router = grad_logits.t() @ x
    else:
        grad_router = torch.mm(grad_logits.t(), x, out=grad_router_into)
    return grad_x, grad_router, grad_w_up, grad_w_down


# ---------------------------------------------------------------------------------------------
# Experts only: routing computed elsewhere (``flashfusemoe.moe_experts``, the JAX bridge's twin)
# ---------------------------------------------------------------------------------------------


class ExpertsOutputs(NamedTuple):
    out: torch.Tensor  # [N, D], x.dtype
    tokens_per_expert: torch.Tensor  # [E] int32


class ExpertsResiduals(NamedTuple):
    assign_to_row: torch.Tensor  # [N*K] int32
    row_to_assign: torch.Tensor  # [R] int32
    expert_ends: torch.Tensor  # [E] int32
    h: torch.Tensor  # [R, 2F] pre-activation; [0, 2F] when recompute=True


def experts_result_specs(num_tokens: int, d_model: int, num_experts: int, top_k: int, two_f: int,
                         recompute: bool, plan: Plan) -> tuple[tuple[tuple[int, ...], str], ...]:
    """``(shape, dtype)`` of each of ``experts_forward``'s ``(*ExpertsOutputs, *ExpertsResiduals)``
    (dtype names as in ``result_specs``)."""
    N, D, E, K = num_tokens, d_model, num_experts, top_k
    R = plan.num_rows(N, K, E)
    return (
        ((N, D), "input"),
        ((E,), "int32"),
        ((N * K,), "int32"),
        ((R,), "int32"),
        ((E,), "int32"),
        ((0 if recompute else R, two_f), "input"),
    )


def check_expert_ids(topk_ids: torch.Tensor, num_experts: int, sync: bool = True,
                     distinct: bool = False) -> None:
    """Every id in ``[0, num_experts)`` and, with ``distinct``, no id twice in a row.

    ``sync``: checked on the host (one device sync), raising ``ValueError`` naming the first bad
    entry. Otherwise asynchronous device-side asserts (no sync): on CUDA a bad id stops the
    process with a device-side assertion at the next sync (nothing runs after it); on CPU it
    raises ``RuntimeError`` at once.
    """
    if topk_ids.numel() == 0:
        return
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    repeated = None
    if distinct and topk_ids.shape[1] > 1:
        ordered = topk_ids.sort(dim=1).values
        repeated = ordered[:, 1:] == ordered[:, :-1]
    if not sync:
        torch._assert_async(~bad.any(), f"topk_ids has an expert id outside [0, {num_experts})")
        if repeated is not None:
            torch._assert_async(~repeated.any(), "topk_ids repeats an expert in a row (distinct_ids=True)")
        return
    if bool(bad.any()):
        n, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"topk_ids must hold expert ids in [0, num_experts={num_experts}), got "
            f"{int(topk_ids[n, k])} at [{n}, {k}]"
        )
    if repeated is not None and bool(repeated.any()):
        n = int(repeated.any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"topk_ids row {n} repeats an expert ({topk_ids[n].tolist()}) but distinct_ids=True promised "
            "K distinct experts per row; pass distinct_ids=False to allow repeats"
        )


def _block_counts(ids: torch.Tensor, num_experts: int, block_n: int) -> torch.Tensor:
    """``[cdiv(N, block_n), E]`` int32: assignments of each block of ``block_n`` tokens per expert
    (what the routing kernel counts for ``layout_and_gather``). ids [N, K] int32, in range."""
    N, K = ids.shape
    blocks = -(-N // block_n)
    token_block = torch.arange(N * K, device=ids.device, dtype=torch.int32) // (K * block_n)
    flat = (token_block * num_experts + ids.reshape(-1)).long()
    counts = torch.zeros(blocks * num_experts, device=ids.device, dtype=torch.int32)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return counts.view(blocks, num_experts)


def experts_forward(x, topk_ids, topk_weights, w_up, w_down, options: MoEOptions, plan: Plan, *,
                    allow_grow: bool = False, check_ids: bool = True,
                    distinct_ids: bool = False) -> tuple[ExpertsOutputs, ExpertsResiduals, Plan]:
    """The experts of the fused MoE on routing computed elsewhere.

    x [N, D]; topk_ids [N, K] int32/int64 (repeats within a row allowed: each assignment counts);
    topk_weights [N, K] floating; w_up [E, 2F, D]; w_down [E, D, F]; ``options``: activation and
    recompute (top_k is K). ``out[n] = sum_k topk_weights[n, k] * expert_{topk_ids[n, k]}(x[n])``
    with the weights applied in the routing dtype (fp32, fp64 for fp64 x), as ``forward`` does.
    ``check_ids``: ``check_expert_ids`` with a host sync; else its device-side asserts. The padded
    layout grows or raises as in ``forward``. ``distinct_ids`` (each row names K distinct experts,
    as a top-k does; checked like the range): the dropless layout and the row gather take one
    launch (``layout_and_gather``, on block counts made here) instead of ``expert_layout`` (one
    program per expert) and ``scatter_rows``. Both layouts are the same.
    """
    N, K = topk_ids.shape
    E = w_up.shape[0]
    check_expert_ids(topk_ids, E, sync=check_ids, distinct=distinct_ids)
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    weights = topk_weights.to(compute_dtype(x.dtype))
    if plan.gemm == "grouped" and distinct_ids and N > 0:
        ids = ids.contiguous()
        block_n = permute.layout_gather_blocks(N, K, E)
        x_sorted, assign_to_row, row_to_assign, expert_ends, tokens_per_expert, _ = permute.layout_and_gather(
            x, ids, E, _block_counts(ids, E, block_n), block_n)
        return _experts_mlp(x, x_sorted, weights, w_up, w_down, assign_to_row, row_to_assign, expert_ends,
                            tokens_per_expert, options, plan)
    assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = permute.expert_layout(
        ids, E, plan.rows_per_expert)
    if plan.gemm == "bmm":
        overflow = int(num_unplaced.sum()) if N > 0 else 0  # the padded layout needs this host sync
        if overflow:
            needed = int(tokens_per_expert.max())
            if not allow_grow:
                raise CapacityOverflowError(
                    f"gemm='bmm': an expert received {needed} assignments but the padded layout holds "
                    f"{plan.rows_per_expert} ({overflow} overflow). Use gemm='grouped'."
                )
            plan = Plan("bmm", needed)
            layout = permute.expert_layout(ids, E, plan.rows_per_expert)
            assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = layout
        x_sorted = permute.gather_rows(x, row_to_assign, K)
    else:  # dropless: assign_to_row is a permutation of the rows
        x_sorted = permute.scatter_rows(x, assign_to_row, K)
    return _experts_mlp(x, x_sorted, weights, w_up, w_down, assign_to_row, row_to_assign, expert_ends,
                        tokens_per_expert, options, plan)


def _experts_mlp(x, x_sorted, weights, w_up, w_down, assign_to_row, row_to_assign, expert_ends,
                 tokens_per_expert, options: MoEOptions, plan: Plan):
    """Forward steps 3-6 on a laid-out ``x_sorted``; returns ``experts_forward``'s results."""
    K = weights.shape[1]
    h = _expert_mm(x_sorted, w_up, expert_ends, plan, trans_b=True)
    a = activation.glu_forward(h, options.activation)
    y = _expert_mm(a, w_down, expert_ends, plan, trans_b=True)
    out = permute.combine_rows(y, assign_to_row, K, weights=weights, out_dtype=x.dtype)
    if options.recompute:
        h = h.new_empty((0, h.shape[1]))
    residuals = ExpertsResiduals(assign_to_row, row_to_assign, expert_ends, h)
    return ExpertsOutputs(out, tokens_per_expert), residuals, plan


def experts_backward(x, topk_weights, w_up, w_down, residuals: ExpertsResiduals, grad_out,
                     options: MoEOptions, plan: Plan):
    """Backward of ``experts_forward``: grad_out [N, D] (or None).

    Returns ``(grad_x [N, D], grad_topk_weights [N, K] (routing dtype), grad_w_up [E, 2F, D],
    grad_w_down [E, D, F])``; ``grad_topk_weights[n, k] = <grad_out[n], expert_{ids[n, k]}(x[n])>``.
    """
    N, K = topk_weights.shape
    E = w_up.shape[0]
    r = residuals
    weights = topk_weights.to(compute_dtype(x.dtype))
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if plan.gemm == "grouped":
        x_sorted, dy = permute.scatter_rows(x, r.assign_to_row, K, second=grad_out)
    else:
        x_sorted, dy = permute.gather_rows(x, r.row_to_assign, K, second=grad_out)
    h = _expert_mm(x_sorted, w_up, r.expert_ends, plan, trans_b=True) if options.recompute else r.h
    da = _expert_mm(dy, w_down, r.expert_ends, plan, trans_b=False)
    dh, a_weighted, grad_w_row = activation.glu_backward(h, da, options.activation, r.row_to_assign, weights)
    grad_w_down = _expert_weight_grad(dy, a_weighted, r.expert_ends, plan, E)
    dx_sorted = _expert_mm(dh, w_up, r.expert_ends, plan, trans_b=False)
    grad_w_up = _expert_weight_grad(dh, x_sorted, r.expert_ends, plan, E)
    grad_x = permute.combine_rows(dx_sorted, r.assign_to_row, K, out_dtype=x.dtype)
    # Every assignment has a row (dropless, or a padded layout that holds them all).
    grad_weights = grad_w_row.index_select(0, r.assign_to_row.long()).view(N, K)
    return grad_x, grad_weights, grad_w_up, grad_w_down
