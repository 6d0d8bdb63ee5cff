"""The functional core: ``forward(...) -> (outputs, residuals)`` and ``backward(...) -> grads``.

No autograd state lives here. The torch ``custom_op`` (``flashfusemoe.ops``) and the JAX
``custom_vjp`` (``jax_bridge``) both call these two functions, which is what keeps the two
frameworks bit-identical. Every residual's shape follows from the inputs and the ``Plan``.
See ``docs/design.md`` for the layout and the launch sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from flashfusemoe.config import MoEOptions
from flashfusemoe.kernels import (
    activation,
    compute_dtype,
    deliver,
    gathered_gemm,
    grouped_gemm,
    out_buffer,
    permute,
    routing,
)


class CapacityOverflowError(RuntimeError):
    """An expert received more tokens than the padded ``gemm="bmm"`` layout holds.

    Raised by ``fused_moe``/``MoELayer`` with ``gemm="bmm"`` (no ``capacity_factor``) where the
    layout cannot grow: under ``torch.compile`` and inside the JAX bridge (which reports it as a
    ``JaxRuntimeError`` naming it). Eager torch grows the layout instead. The message gives the
    load that overflowed; pass a larger ``max_tokens_per_expert`` (``calibrate_max_tokens``) or
    use ``gemm="grouped"``.
    """


@dataclass(frozen=True)
class Plan:
    """How a call runs: ``gemm`` is "grouped", "gathered" or "fused_dgrad" (the dropless layout,
    R = N*K; "gathered" runs the gathered up-projection with the GLU in its epilogue, "fused_dgrad"
    the GLU backward in the epilogue of the down-projection's input gradient) or "bmm" (padded,
    R = E*M)."""

    gemm: str
    rows_per_expert: int = 0  # M of the padded layout; 0 for grouped

    def num_rows(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        return self.rows_per_expert * num_experts if self.gemm == "bmm" else num_tokens * top_k


class Outputs(NamedTuple):
    """What a forward call returns to its caller."""

    out: torch.Tensor | None = None  # [N, D], x.dtype
    logits: torch.Tensor | None = None  # [N, E], routing dtype; differentiable (aux losses)
    tokens_per_expert: torch.Tensor | None = None  # [E] int32, after top-k, before capacity
    dropped_tokens: torch.Tensor | None = None  # [] int32, dropped assignments


class Residuals(NamedTuple):
    """What backward needs besides the inputs and ``logits``."""

    topk_ids: torch.Tensor | None = None  # [N, K] int32
    topk_weights: torch.Tensor | None = None  # [N, K] routing dtype
    assign_to_row: torch.Tensor | None = None  # [N*K] int32
    row_to_assign: torch.Tensor | None = None  # [R] int32
    expert_ends: torch.Tensor | None = None  # [E] int32
    h: torch.Tensor | None = None  # [R, 2F] pre-activation; [0, 2F] when recompute=True


class Grads(NamedTuple):
    """Gradients of the four differentiable inputs, each shaped like its input."""

    x: torch.Tensor | None = None
    router_weight: torch.Tensor | None = None
    w_up: torch.Tensor | None = None
    w_down: torch.Tensor | None = None


# Destinations: ``forward`` and ``backward`` take an ``Outputs``/``Residuals``/``Grads`` of
# optional tensors (``*_into``; the JAX bridge passes XLA's output buffers). The policy is that of
# every ``*_out`` buffer in ``flashfusemoe.kernels``: a destination must fit its result exactly
# (``ValueError`` otherwise) and holds it on return, written there by the kernel that produces it
# where that kernel can (routing, the dropless layout, ``h``, ``out``, ``grad_x``, the router
# gradient, the TMA/bmm weight gradients), else copied there once (``_settle``).


def _settle(results: NamedTuple, into: NamedTuple | None) -> NamedTuple:
    """``results`` with each one that has a destination in ``into`` placed there."""
    if into is None:
        return results
    kind = type(results).__name__
    return type(results)(*(deliver(r, d, f"{kind}.{name}")
                           for r, d, name in zip(results, into, results._fields, strict=True)))


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
    in ``out`` when given."""
    if plan.gemm == "bmm":
        M = plan.rows_per_expert
        a3, b3 = a.view(num_experts, M, a.shape[1]), b.view(num_experts, M, b.shape[1])
        out = out_buffer(out, (num_experts, a.shape[1], b.shape[1]), a.dtype, a.device, "out",
                         float32_ok=True)
        if out.dtype != a.dtype:  # torch.bmm writes only its operands' dtype
            return out.copy_(torch.bmm(a3.transpose(1, 2), b3))
        return torch.bmm(a3.transpose(1, 2), b3, out=out)
    return grouped_gemm.grouped_mm_weight_grad(a, b, expert_ends, out=out)


def _layout(topk_ids, topk_weights, num_experts, plan: Plan, options: MoEOptions):
    keep = None
    if options.capacity_factor is not None:
        capacity = options.capacity(topk_ids.shape[0], num_experts)
        keep = permute.capacity_keep(topk_ids, topk_weights, num_experts, capacity)
    return permute.expert_layout(topk_ids, num_experts, plan.rows_per_expert, keep)


def _fit_padded_layout(make_layout, plan: Plan, allow_grow: bool, check: bool, hint: str):
    """``make_layout(plan)``; with ``check`` (the padded layout without capacity), an expert that
    overflows it grows the layout when ``allow_grow`` (one host sync) and raises
    ``CapacityOverflowError`` otherwise. Returns the layout and the plan used."""
    layout = make_layout(plan)
    if not check:
        return layout, plan
    overflow = int(layout.num_unplaced.sum())  # the padded layout needs this host sync
    if overflow:
        needed = int(layout.tokens_per_expert.max())
        if not allow_grow:
            raise CapacityOverflowError(
                f"gemm='bmm': an expert received {needed} assignments but the padded layout holds "
                f"{plan.rows_per_expert} per expert ({overflow} overflow). {hint}"
            )
        plan = Plan("bmm", needed)
        layout = make_layout(plan)
    return layout, plan


def _up_reads_by_index(plan: Plan) -> bool:
    """Whether the up-projection reads x by token index (``up_proj_glu``, the GLU in its epilogue,
    ``h`` written straight to its destination) instead of from laid-out rows: ``"gathered"`` and
    ``"fused_dgrad"``."""
    return plan.gemm in ("gathered", "fused_dgrad")


def _rows_to_gather(x, plan: Plan):
    """What the layout kernel copies into expert order: x, or nothing (a zero-width view) where the
    up-projection reads x by token index itself."""
    return x[:, :0] if _up_reads_by_index(plan) else x


def _up_projection(x, laid_out: list, w_up, row_to_assign, expert_ends, top_k: int, options: MoEOptions,
                   plan: Plan, h_into=None):
    """The up-projection and GLU on the laid-out ``x_sorted [R, D]`` that ``laid_out`` holds (a
    one-item list this call empties, so those rows are freed as soon as the GEMM that reads them
    is enqueued; unused where the up-projection reads x by token index). Returns
    ``(a [R, F], h)``, ``h`` the pre-activation (in ``h_into`` when given; ``[0, 2F]`` with
    ``recompute``). A full ``h`` that only feeds the GLU (the one copied into ``h_into``) dies on
    return, before the down-projection allocates its ``[R, D]`` output."""
    x_sorted = laid_out.pop()
    if options.recompute:
        h_into = None
    if _up_reads_by_index(plan):
        a, h = gathered_gemm.up_proj_glu(x, w_up, row_to_assign, expert_ends, top_k, options.activation,
                                         h_out=h_into, save_h=not options.recompute)
    else:
        h = _expert_mm(x_sorted, w_up, expert_ends, plan, trans_b=True)
        del x_sorted
        a = activation.glu_forward(h, options.activation, h_copy=h_into)  # h_into receives h too
    if options.recompute:
        return a, x.new_empty((0, w_up.shape[1]))
    return a, h if h_into is None else h_into


def _down_projection(a, w_down, assign_to_row, expert_ends, topk_weights, out_dtype, plan: Plan,
                     out_into=None):
    """The down-projection of ``a [R, F]`` and the weighted combine: ``out [N, D]``."""
    y = _expert_mm(a, w_down, expert_ends, plan, trans_b=True)
    return permute.combine_rows(y, assign_to_row, topk_weights.shape[1], weights=topk_weights,
                                out_dtype=out_dtype, out=out_into)


def _mlp_forward(x, laid_out: list, topk_weights, w_up, w_down, assign_to_row, row_to_assign, expert_ends,
                 options: MoEOptions, plan: Plan, h_into=None, out_into=None):
    """``_up_projection`` then ``_down_projection``: ``(out [N, D], h)``. ``laid_out`` as for
    ``_up_projection`` (the caller keeps no other reference to those rows)."""
    a, h = _up_projection(x, laid_out, w_up, row_to_assign, expert_ends, topk_weights.shape[1], options,
                          plan, h_into=h_into)
    out = _down_projection(a, w_down, assign_to_row, expert_ends, topk_weights, x.dtype, plan,
                           out_into=out_into)
    return out, h


def _scratch_in(buffer: torch.Tensor | None, *specs: tuple[tuple[int, ...], torch.dtype]) -> list:
    """Views over ``buffer``'s memory for scratch tensors that die before ``buffer``'s own result
    is written there: one contiguous ``shape`` view of ``dtype`` per ``(shape, dtype)`` in
    ``specs``, or None for one that gets no room. All of them end to end (16-byte aligned) when
    they fit together, else the largest that fits alone; none without a contiguous buffer."""
    views = [None] * len(specs)
    if buffer is None or not buffer.is_contiguous() or buffer.data_ptr() % 16:
        return views
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    capacity = buffer.numel() * buffer.element_size()
    starts = [sum(-(-n // 16) * 16 for n in sizes[:i]) for i in range(len(sizes))]
    if starts[-1] + sizes[-1] <= capacity:
        placed = list(range(len(specs)))
    else:
        fitting = [i for i, n in enumerate(sizes) if n <= capacity]
        placed = [max(fitting, key=sizes.__getitem__)] if fitting else []
        starts = [0] * len(specs)
    memory = buffer.view(-1).view(torch.uint8)
    for i in placed:
        (shape, dtype), start = specs[i], starts[i]
        views[i] = memory[start:start + sizes[i]].view(dtype).view(shape)
    return views


def _mlp_backward(x, grad_out, topk_weights, w_up, w_down, r, options: MoEOptions, plan: Plan, g,
                  every_row_assigned: bool):
    """Backward of ``_up_projection`` and ``_down_projection`` up to the combine: ``r`` holds the
    layout maps and ``h``; ``g`` the weight gradients' destinations. Returns ``(dx_sorted [R, D],
    grad_w_row [R], grad_w_up, grad_w_down)``, ``grad_w_row`` the gradient of each row's routing
    weight.

    Each ``[R, *]`` temporary is released once its last reader is enqueued: dy and ``a * w`` after
    the w_down gradient, then x is laid out (without recompute), and freed after the w_up gradient,
    before ``dx_sorted`` is allocated. So at most one ``[R, D]`` buffer is alive beside ``dh``.
    """
    K, E = topk_weights.shape[1], w_up.shape[0]
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    # "gathered": every GEMM that reads x or dy per row takes it by token index; nothing is laid out.
    by_index = plan.gemm == "gathered"
    up_by_index = _up_reads_by_index(plan)  # (then recompute needs no laid-out x either)

    def lay_out(src, second=None, out=None):  # token rows [N, D] into expert order [R, D]
        if every_row_assigned:
            return permute.scatter_rows(src, r.assign_to_row, K, second=second, out=out)
        return permute.gather_rows(src, r.row_to_assign, K, second=second, out=out)

    # a * w and dy live in the w_up gradient's destination when there is one (the JAX bridge's
    # XLA buffer, a float32 gradient under autocast) until that gradient overwrites it.
    R, F = r.row_to_assign.numel(), w_down.shape[2]
    aw_into, dy_into = _scratch_in(g.w_up, ((R, F), x.dtype),
                                   ((0 if by_index else R, x.shape[1]), grad_out.dtype))
    x_sorted = dy = None
    if options.recompute and not up_by_index:  # h needs the laid-out x first: both in one launch
        x_sorted, dy = lay_out(x, second=grad_out)
    elif not by_index:  # x is laid out once dy and a * w are freed
        dy = lay_out(grad_out, out=dy_into)
    if not options.recompute:
        h = r.h
    elif up_by_index:  # the forward's own kernel, so h is bit-identical to the forward's
        h = gathered_gemm.up_proj_glu(x, w_up, r.row_to_assign, r.expert_ends, K, options.activation,
                                      save_a=False)[1]
    else:
        h = _expert_mm(x_sorted, w_up, r.expert_ends, plan, trans_b=True)
    if plan.gemm == "fused_dgrad" and gathered_gemm.sorted_dgrad_glu_runs(dy):
        dh, a_weighted, grad_w_row = gathered_gemm.sorted_dgrad_glu(
            dy, w_down, h, r.row_to_assign, r.expert_ends, topk_weights, K, options.activation,
            a_weighted_out=aw_into)
    else:
        if by_index:
            da = gathered_gemm.gathered_mm(grad_out, w_down, r.row_to_assign, r.expert_ends, K)
        else:
            da = _expert_mm(dy, w_down, r.expert_ends, plan, trans_b=False)
        dh, a_weighted, grad_w_row = activation.glu_backward(h, da, options.activation, r.row_to_assign,
                                                             topk_weights, a_weighted_out=aw_into)
        del da
    del h
    if by_index:
        grad_w_down = gathered_gemm.gathered_weight_grad(grad_out, a_weighted, r.row_to_assign, r.expert_ends,
                                                         K, "a", out=g.w_down)
        grad_w_up = gathered_gemm.gathered_weight_grad(dh, x, r.row_to_assign, r.expert_ends, K, "b",
                                                       out=g.w_up)
    else:
        grad_w_down = _expert_weight_grad(dy, a_weighted, r.expert_ends, plan, E, out=g.w_down)
        del dy, a_weighted
        if x_sorted is None:
            x_sorted = lay_out(x)
        grad_w_up = _expert_weight_grad(dh, x_sorted, r.expert_ends, plan, E, out=g.w_up)
        del x_sorted
    dx_sorted = _expert_mm(dh, w_up, r.expert_ends, plan, trans_b=False)
    return dx_sorted, grad_w_row, grad_w_up, grad_w_down


def forward(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions, plan: Plan, *,
            allow_grow: bool = False, outputs_into: Outputs | None = None,
            residuals_into: Residuals | None = None) -> tuple[Outputs, Residuals, Plan]:
    """Fused MoE forward.

    x [N, D]; router_weight [E, D]; w_up [E, 2F, D]; w_down [E, D, F]; expert_bias [E] or None.
    Returns the outputs, the residuals backward needs, and the plan actually used: with
    ``gemm="bmm"`` an overflow of the padded layout grows it (one host sync) when
    ``allow_grow``, and raises ``CapacityOverflowError`` otherwise. Capacity mode never overflows.
    ``outputs_into``/``residuals_into``: destinations (see ``_settle``).
    """
    K = options.top_k
    E = router_weight.shape[0]
    o = outputs_into or Outputs()
    r = residuals_into or Residuals()
    grouped = plan.gemm != "bmm"
    route = routing.route_forward(
        x, router_weight, expert_bias, K, options.score_func, options.norm_topk_prob, options.n_group,
        options.topk_group, float(options.routed_scaling_factor), with_block_counts=grouped,
        logits_out=o.logits, ids_out=r.topk_ids, weights_out=r.topk_weights,
    )
    logits, topk_ids, topk_weights = route[:3]
    if grouped:
        # Default path: the routing kernel counts tokens per block and expert, so the layout and
        # the row gather take one launch. Capacity then drops rows in place (zeros, -1 maps).
        layout_out = permute.Layout(r.assign_to_row, r.row_to_assign, r.expert_ends, o.tokens_per_expert,
                                    None if o.dropped_tokens is None else o.dropped_tokens.view(1))
        x_sorted, assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = (
            permute.layout_and_gather(_rows_to_gather(x, plan), topk_ids, E, *route[3:], out=layout_out))
        if options.capacity_factor is not None:
            num_unplaced = permute.capacity_drop(x_sorted, topk_weights, assign_to_row, row_to_assign,
                                                 expert_ends, options.capacity(x.shape[0], E))
    else:
        layout, plan = _fit_padded_layout(
            lambda p: _layout(topk_ids, topk_weights, E, p, options), plan, allow_grow,
            check=plan.gemm == "bmm" and options.capacity_factor is None and x.shape[0] > 0,
            hint="Pass a larger max_tokens_per_expert (see calibrate_max_tokens) or use gemm='grouped'.")
        assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = layout
        x_sorted = permute.gather_rows(x, row_to_assign, K)
    laid_out = [x_sorted]
    del x_sorted  # (_up_projection frees it after its GEMM)
    out, h = _mlp_forward(x, laid_out, topk_weights, w_up, w_down, assign_to_row, row_to_assign, expert_ends,
                          options, plan, h_into=r.h, out_into=o.out)
    outputs = Outputs(out, logits, tokens_per_expert, num_unplaced.reshape(()))
    residuals = Residuals(topk_ids, topk_weights, assign_to_row, row_to_assign, expert_ends, h)
    return _settle(outputs, outputs_into), _settle(residuals, residuals_into), plan


def backward(x, router_weight, w_up, w_down, logits, residuals: Residuals, grad_out, grad_logits,
             options: MoEOptions, plan: Plan, *, into: Grads | None = None) -> Grads:
    """Fused MoE backward.

    grad_out [N, D] (or None); grad_logits [N, E] from aux losses (or None).
    Returns the ``Grads`` of x, router_weight, w_up and w_down; ``into``: destinations (see ``_settle``).
    ``into.w_up``/``into.w_down`` may be float32 for 16-bit weights (the gradients of float32 master
    weights under autocast): the weight-gradient kernels store their float32 accumulator there.
    """
    K = options.top_k
    r = residuals
    g = into or Grads()
    dx_sorted, grad_w_row, grad_w_up, grad_w_down = _mlp_backward(
        x, grad_out, r.topk_weights, w_up, w_down, r, options, plan, g,
        every_row_assigned=plan.gemm != "bmm" and options.capacity_factor is None)
    # grad_logits in x's dtype feeds the router's two GEMMs (its term of grad_x, in the combine,
    # and the router-weight gradient) with fp32 accumulation, as an autocast linear layer would.
    grad_logits = routing.route_backward(
        logits, r.topk_ids, grad_w_row, r.assign_to_row, grad_logits, options.score_func,
        options.norm_topk_prob, float(options.routed_scaling_factor), out_dtype=x.dtype,
    )
    grad_x = permute.combine_rows(dx_sorted, r.assign_to_row, K, logit_grad=grad_logits,
                                  router_weight=router_weight, out_dtype=x.dtype, out=g.x)
    if g.router_weight is None:
        grad_router = grad_logits.t() @ x
    else:  # (torch.mm's out= would resize a mis-shaped buffer: check it first)
        grad_router = torch.mm(grad_logits.t(), x, out=out_buffer(
            g.router_weight, router_weight.shape, x.dtype, x.device, "Grads.router_weight"))
    return _settle(Grads(grad_x, grad_router, grad_w_up, grad_w_down), into)


# ---------------------------------------------------------------------------------------------
# Experts only: routing computed elsewhere (``flashfusemoe.moe_experts``, the JAX bridge's twin)
# ---------------------------------------------------------------------------------------------


class ExpertsOutputs(NamedTuple):
    """What ``experts_forward`` returns to its caller."""

    out: torch.Tensor | None = None  # [N, D], x.dtype
    tokens_per_expert: torch.Tensor | None = None  # [E] int32


class ExpertsResiduals(NamedTuple):
    """What ``experts_backward`` needs besides the inputs."""

    assign_to_row: torch.Tensor | None = None  # [N*K] int32
    row_to_assign: torch.Tensor | None = None  # [R] int32
    expert_ends: torch.Tensor | None = None  # [E] int32
    h: torch.Tensor | None = None  # [R, 2F] pre-activation; [0, 2F] when recompute=True


class ExpertsGrads(NamedTuple):
    """Gradients of ``experts_forward``'s differentiable inputs, each shaped like its input
    (``topk_weights``' in its dtype)."""

    x: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    w_up: torch.Tensor | None = None
    w_down: torch.Tensor | None = None


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
                    allow_grow: bool = False, check_ids: bool = True, distinct_ids: bool = False,
                    outputs_into: ExpertsOutputs | None = None,
                    residuals_into: ExpertsResiduals | None = None,
                    ) -> tuple[ExpertsOutputs, ExpertsResiduals, Plan]:
    """The experts of the fused MoE on routing computed elsewhere.

    x [N, D]; topk_ids [N, K] int32/int64 (repeats within a row allowed: each assignment counts);
    topk_weights [N, K] floating; w_up [E, 2F, D]; w_down [E, D, F]; ``options``: activation and
    recompute (top_k is K). ``out[n] = sum_k topk_weights[n, k] * expert_{topk_ids[n, k]}(x[n])``
    with the weights applied in the routing dtype (fp32, fp64 for fp64 x), as ``forward`` does.
    ``check_ids``: ``check_expert_ids`` with a host sync; else its device-side asserts. The padded
    layout grows or raises as in ``forward``. ``distinct_ids`` (each row names K distinct experts,
    as a top-k does; checked like the range): the dropless layout and the row gather take one
    launch (``layout_and_gather``, on block counts made here) instead of ``expert_layout`` (one
    program per expert) and ``scatter_rows``. Both layouts are the same. Destinations: as ``forward``.
    """
    N, K = topk_ids.shape
    E = w_up.shape[0]
    o = outputs_into or ExpertsOutputs()
    r = residuals_into or ExpertsResiduals()
    check_expert_ids(topk_ids, E, sync=check_ids, distinct=distinct_ids)
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    weights = topk_weights.to(compute_dtype(x.dtype))
    if plan.gemm != "bmm" and distinct_ids and N > 0:
        ids = ids.contiguous()
        block_n = permute.layout_gather_blocks(N, K, E)
        layout_out = permute.Layout(r.assign_to_row, r.row_to_assign, r.expert_ends, o.tokens_per_expert)
        x_sorted, assign_to_row, row_to_assign, expert_ends, tokens_per_expert, _ = permute.layout_and_gather(
            _rows_to_gather(x, plan), ids, E, _block_counts(ids, E, block_n), block_n, out=layout_out)
    else:
        layout, plan = _fit_padded_layout(lambda p: permute.expert_layout(ids, E, p.rows_per_expert), plan,
                                          allow_grow, check=plan.gemm == "bmm" and N > 0,
                                          hint="Use gemm='grouped'.")
        assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced = layout
        if plan.gemm == "bmm":
            x_sorted = permute.gather_rows(x, row_to_assign, K)
        elif not _up_reads_by_index(plan):  # dropless: assign_to_row permutes the rows
            x_sorted = permute.scatter_rows(x, assign_to_row, K)
        else:
            x_sorted = None
    laid_out = [x_sorted]
    del x_sorted  # (_up_projection frees it after its GEMM)
    out, h = _mlp_forward(x, laid_out, weights, w_up, w_down, assign_to_row, row_to_assign, expert_ends,
                          options, plan, h_into=r.h, out_into=o.out)
    outputs = ExpertsOutputs(out, tokens_per_expert)
    residuals = ExpertsResiduals(assign_to_row, row_to_assign, expert_ends, h)
    return _settle(outputs, outputs_into), _settle(residuals, residuals_into), plan


def experts_backward(x, topk_weights, w_up, w_down, residuals: ExpertsResiduals, grad_out,
                     options: MoEOptions, plan: Plan, *, into: ExpertsGrads | None = None) -> ExpertsGrads:
    """Backward of ``experts_forward``: grad_out [N, D] (or None). Returns the ``ExpertsGrads``,
    ``grad_topk_weights[n, k] = <grad_out[n], expert_{ids[n, k]}(x[n])>`` in topk_weights' dtype;
    ``into``: destinations."""
    N, K = topk_weights.shape
    g = into or ExpertsGrads()
    weights = topk_weights.to(compute_dtype(x.dtype))
    dx_sorted, grad_w_row, grad_w_up, grad_w_down = _mlp_backward(
        x, grad_out, weights, w_up, w_down, residuals, options, plan, g,
        every_row_assigned=plan.gemm != "bmm")
    grad_x = permute.combine_rows(dx_sorted, residuals.assign_to_row, K, out_dtype=x.dtype, out=g.x)
    # Every assignment has a row (dropless, or a padded layout that holds them all).
    grad_weights = grad_w_row.index_select(0, residuals.assign_to_row.long()).view(N, K)
    grad_weights = grad_weights.to(topk_weights.dtype)
    return _settle(ExpertsGrads(grad_x, grad_weights, grad_w_up, grad_w_down), into)
