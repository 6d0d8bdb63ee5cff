"""Torch wiring of the functional core: two ``torch.library.custom_op``s and their autograd.

``custom_op`` + ``register_fake`` + ``register_autograd`` is what lets ``torch.compile``
(fullgraph) trace a model containing the layer, forward and backward.
"""

import contextlib
from typing import Optional

import torch
from torch import Tensor

from flashfusemoe import core
from flashfusemoe.config import MoEOptions
from flashfusemoe.kernels import compute_dtype


def _options_to_args(options: MoEOptions) -> dict:
    """Flattens options into the primitive arguments a custom op schema accepts (None -> 0)."""
    return dict(
        top_k=options.top_k,
        activation=options.activation,
        score_func=options.score_func,
        norm_topk_prob=options.norm_topk_prob,
        n_group=options.n_group or 0,
        topk_group=options.topk_group or 0,
        routed_scaling_factor=float(options.routed_scaling_factor),
        capacity_factor=float(options.capacity_factor or 0.0),
        recompute=options.recompute,
    )


def _options_from_args(top_k, activation, score_func, norm_topk_prob, n_group, topk_group,
                       routed_scaling_factor, capacity_factor, recompute) -> MoEOptions:
    return MoEOptions(
        top_k=top_k, activation=activation, score_func=score_func, norm_topk_prob=norm_topk_prob,
        n_group=n_group or None, topk_group=topk_group or None,
        routed_scaling_factor=routed_scaling_factor, capacity_factor=capacity_factor or None,
        recompute=recompute,
    )


def _no_autocast(device_type: str):
    """Autocast off inside the op (the inputs are cast already); a no-op context when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("flashfusemoe::moe_forward", mutates_args=())
def moe_forward(
    x: Tensor, router_weight: Tensor, w_up: Tensor, w_down: Tensor, expert_bias: Optional[Tensor],
    top_k: int, activation: str, score_func: str, norm_topk_prob: bool, n_group: int, topk_group: int,
    routed_scaling_factor: float, capacity_factor: float, recompute: bool,
    gemm: str, rows_per_expert: int, allow_grow: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(*core.Outputs, *core.Residuals)``."""
    options = _options_from_args(top_k, activation, score_func, norm_topk_prob, n_group, topk_group,
                                 routed_scaling_factor, capacity_factor, recompute)
    with _no_autocast(x.device.type):
        outputs, residuals, _ = core.forward(
            x, router_weight, w_up, w_down, expert_bias, options, core.Plan(gemm, rows_per_expert),
            allow_grow=allow_grow,
        )
    return (*outputs, *residuals)


@moe_forward.register_fake
def _(x, router_weight, w_up, w_down, expert_bias, top_k, activation, score_func, norm_topk_prob,
      n_group, topk_group, routed_scaling_factor, capacity_factor, recompute, gemm, rows_per_expert,
      allow_grow):
    options = _options_from_args(top_k, activation, score_func, norm_topk_prob, n_group, topk_group,
                                 routed_scaling_factor, capacity_factor, recompute)
    specs = core.result_specs(x.shape[0], x.shape[1], w_up.shape[0], w_up.shape[1], options,
                              core.Plan(gemm, rows_per_expert))
    dtypes = {"input": x.dtype, "route": compute_dtype(x.dtype), "int32": torch.int32}
    return tuple(x.new_empty(shape, dtype=dtypes[kind]) for shape, kind in specs)


@torch.library.custom_op("flashfusemoe::moe_backward", mutates_args=())
def moe_backward(
    x: Tensor, router_weight: Tensor, w_up: Tensor, w_down: Tensor, logits: Tensor,
    topk_ids: Tensor, topk_weights: Tensor, assign_to_row: Tensor, row_to_assign: Tensor,
    expert_ends: Tensor, h: Tensor, grad_out: Optional[Tensor], grad_logits: Optional[Tensor],
    top_k: int, activation: str, score_func: str, norm_topk_prob: bool, n_group: int, topk_group: int,
    routed_scaling_factor: float, capacity_factor: float, recompute: bool, gemm: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_x, grad_router_weight, grad_w_up, grad_w_down)``."""
    options = _options_from_args(top_k, activation, score_func, norm_topk_prob, n_group, topk_group,
                                 routed_scaling_factor, capacity_factor, recompute)
    E = router_weight.shape[0]
    plan = core.Plan(gemm, row_to_assign.shape[0] // E if gemm == "bmm" else 0)
    residuals = core.Residuals(topk_ids, topk_weights, assign_to_row, row_to_assign, expert_ends, h)
    with _no_autocast(x.device.type):
        return core.backward(x, router_weight, w_up, w_down, logits, residuals, grad_out, grad_logits,
                             options, plan)


@moe_backward.register_fake
def _(x, router_weight, w_up, w_down, *args):
    return (torch.empty_like(x), torch.empty_like(router_weight), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _setup_context(ctx, inputs, output):
    x, router_weight, w_up, w_down = inputs[:4]
    ctx.option_args = inputs[5:15]  # top_k .. gemm: moe_backward's trailing arguments, in order
    ctx.save_for_backward(x, router_weight, w_up, w_down, output[1], *output[4:])
    # Residuals carry no gradient, and unused outputs must not be materialised as zero tensors
    # (a zero [R, 2F] gradient for h would cost a full memset).
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_logits, *unused):
    saved = ctx.saved_tensors
    grads = moe_backward(*saved, grad_out, grad_logits, *ctx.option_args)
    return (*grads, *([None] * 13))


torch.library.register_autograd("flashfusemoe::moe_forward", _backward, setup_context=_setup_context)

class _EagerMoE(torch.autograd.Function):
    """The same core without the custom-op dispatch, whose Python overhead (~1 ms per call on
    an H200 host) exceeds the whole layer's GPU time at the seed shape. Used outside tracing."""

    @staticmethod
    def forward(ctx, x, router_weight, w_up, w_down, expert_bias, options, plan, allow_grow):
        with _no_autocast(x.device.type):
            outputs, residuals, plan = core.forward(x, router_weight, w_up, w_down, expert_bias, options,
                                                    plan, allow_grow=allow_grow)
        ctx.options, ctx.plan = options, plan
        ctx.save_for_backward(x, router_weight, w_up, w_down, outputs.logits, *residuals)
        ctx.mark_non_differentiable(*outputs[2:])
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_out, grad_logits, *unused):
        x, router_weight, w_up, w_down, logits, *residuals = ctx.saved_tensors
        with _no_autocast(x.device.type):
            grads = core.backward(x, router_weight, w_up, w_down, logits, core.Residuals(*residuals),
                                  grad_out, grad_logits, ctx.options, ctx.plan)
        return (*grads, None, None, None, None)


def moe_forward_call(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions, plan: core.Plan,
                     allow_grow: bool):
    """Runs the fused MoE: the custom op when traced by torch.compile, else ``_EagerMoE``.

    Both call ``core.forward``/``core.backward``. Returns ``core.Outputs``.
    """
    if torch.compiler.is_compiling():
        results = moe_forward(x, router_weight, w_up, w_down, expert_bias, **_options_to_args(options),
                              gemm=plan.gemm, rows_per_expert=plan.rows_per_expert, allow_grow=allow_grow)
    else:
        results = _EagerMoE.apply(x, router_weight, w_up, w_down, expert_bias, options, plan, allow_grow)
    return core.Outputs(*results[:4])
