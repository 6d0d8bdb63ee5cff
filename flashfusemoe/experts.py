"""``moe_experts``: the fused experts on routing computed elsewhere (torch wiring of
``core.experts_forward`` / ``core.experts_backward``).

As in ``flashfusemoe.ops``: a ``torch.library.custom_op`` with ``register_fake`` and
``register_autograd`` for ``torch.compile``, and a plain ``autograd.Function`` (no custom-op
dispatch overhead) outside tracing. Both call the same core functions.
"""

from typing import Optional

import torch
from torch import Tensor

from flashfusemoe import core
from flashfusemoe.config import (
    ACTIVATIONS,
    FLOAT_DTYPES,
    GEMMS,
    MoEOptions,
    _describe,
    autocast_dtype,
    check_bool,
    check_has_data,
)
from flashfusemoe.ops import (
    _no_autocast,
    autocast_weights,
    cast_results,
    compute_weights,
    fake_cast_results,
    op_name,
    weight_grads_into,
    weights_used,
)

ID_DTYPES = (torch.int32, torch.int64)


def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_up: Tensor, w_down: Tensor, *,
                activation: str = "swiglu", gemm: str = "auto", recompute: bool = False,
                check_ids: bool = True, distinct_ids: bool = False,
                max_tokens_per_expert: int | None = None) -> Tensor:
    """GLU experts on given routing: ``out[n] = sum_k topk_weights[n, k] * expert_{topk_ids[n, k]}(x[n])``.

    x [N, D]; topk_ids [N, K] int32/int64 in [0, E); topk_weights [N, K] floating; w_up [E, 2F, D]
    (rows 0:F gate, F:2F up); w_down [E, D, F]. Returns ``out`` [N, D] of x's dtype. Differentiable
    in x, topk_weights (gradient of topk_weights' dtype), w_up and w_down.

    - A row may name an expert more than once: each of its K assignments counts, weighted by its
      own weight (so ids [e, e] with weights [a, b] give ``(a + b) * expert_e(x)``).
    - The weights are applied in fp32 (fp64 for fp64 x) whatever their dtype, and the K terms are
      summed in fp32 (fp64) before the cast to x's dtype.
    - ``check_ids=True`` checks the id range on the host: one device sync per call, and a
      ``ValueError`` naming the first bad id. ``check_ids=False`` skips the sync (for ids known to
      be in range, e.g. from a top-k over E scores, and for CUDA graphs): an out-of-range id then
      trips a device-side assert instead (fatal on CUDA, a ``RuntimeError`` on CPU). No id is ever
      clipped or dropped.
    - ``distinct_ids=True`` promises K distinct experts per row (as from a top-k; checked with the
      range, a repeat raising ``ValueError`` or tripping the device-side assert): the dropless layout
      and the row gather then take one launch instead of two.
    - ``gemm``: as ``fused_moe``'s: "grouped" (dropless), "gathered" (dropless; the up-projection
      reads x by token index with the GLU in its epilogue), "fused_dgrad" (dropless; the GLU
      backward in the epilogue of the down-projection's input gradient) or "bmm" (padded layout of
      twice the mean load per expert, grown with one host sync when an expert overflows it; under
      ``torch.compile`` an overflow raises ``CapacityOverflowError``). "auto": "gathered" for
      experts of width F <= ``GATHERED_MAX_FFN``, else "fused_dgrad" for D <=
      ``FUSED_DGRAD_MAX_D_MODEL``, else "grouped" (the rule of ``fused_moe``).
    - ``max_tokens_per_expert``: with ``gemm="bmm"``, the padded layout's rows per expert instead of
      twice the mean load (``N * K`` never overflows; the JAX bridge, which cannot grow the layout,
      needs it where routing may be skewed).
    - ``recompute``: recompute the pre-activation in backward instead of saving it.
    Under torch autocast, x and the expert weights are cast to its dtype (float32 weights inside the
    op, and their gradients come back in float32, as in ``fused_moe``).
    """
    options, plan = experts_plan(x, topk_ids, topk_weights, w_up, w_down, activation=activation, gemm=gemm,
                                 recompute=recompute, check_ids=check_ids, distinct_ids=distinct_ids,
                                 max_tokens_per_expert=max_tokens_per_expert)
    check_has_data("x", x)
    dtype = autocast_dtype(x)
    if dtype is not None:
        x = x.to(dtype)
        w_up, w_down = autocast_weights(dtype, w_up, w_down)
    x, w_up, w_down = x.contiguous(), w_up.contiguous(), w_down.contiguous()
    allow_grow = not torch.compiler.is_compiling()
    if torch.compiler.is_compiling():
        results = experts_forward_op(x, topk_ids, topk_weights, w_up, w_down, options.activation,
                                     options.recompute, plan.gemm, plan.rows_per_expert, allow_grow,
                                     check_ids, distinct_ids)
    else:
        results = _EagerExperts.apply(x, topk_ids, topk_weights, w_up, w_down, options, plan, allow_grow,
                                      check_ids, distinct_ids)
    return results[0]


def validate_experts_inputs(x, topk_ids, topk_weights, w_up, w_down, *, autocast: bool = False):
    """Checks types, ranks, shapes, dtypes and devices of ``moe_experts``' tensors.

    Returns ``(N, D, E, F, K)``. ``autocast``: x and the expert weights may differ in dtype (torch
    autocast casts them). The id range is checked by ``core.check_expert_ids``.
    """
    named = {"x": x, "topk_ids": topk_ids, "topk_weights": topk_weights, "w_up": w_up, "w_down": w_down}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("x", "topk_weights", "w_up", "w_down"):
        if named[name].dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype in {FLOAT_DTYPES}, got {named[name].dtype}")
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got {_describe(x)}")
    N, D = x.shape
    for name, rank in (("w_up", 3), ("w_down", 3), ("topk_ids", 2), ("topk_weights", 2)):
        if named[name].dim() != rank:
            raise ValueError(f"{name} must have rank {rank}, got {_describe(named[name])}")
    E = w_up.shape[0]
    if w_up.shape[2] != D:
        raise ValueError(f"w_up must be [E, 2F, D={D}], got {_describe(w_up)}")
    if w_up.shape[1] % 2:
        raise ValueError(f"w_up must have an even number of rows (gate and up halves), got {w_up.shape[1]}")
    F = w_up.shape[1] // 2
    if tuple(w_down.shape) != (E, D, F):
        raise ValueError(f"w_down must be [E={E}, D={D}, F={F}], got {_describe(w_down)}")
    if E < 1 or D < 1 or F < 1:
        raise ValueError(f"E={E}, D={D} and F={F} must all be >= 1")
    if topk_ids.shape[0] != N or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be [N={N}, K] with K >= 1, got {_describe(topk_ids)}")
    K = topk_ids.shape[1]
    if tuple(topk_weights.shape) != (N, K):
        raise ValueError(f"topk_weights must be [N={N}, K={K}] like topk_ids, got {_describe(topk_weights)}")
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all must share a device")
    for name in ("w_up", "w_down"):
        if named[name].dtype != x.dtype and not autocast:
            raise TypeError(f"{name} has dtype {named[name].dtype} but x has {x.dtype}; they must match")
    return N, D, E, F, K


def experts_plan(x, topk_ids, topk_weights, w_up, w_down, *, activation, gemm, recompute, check_ids,
                 distinct_ids=False, max_tokens_per_expert=None):
    """Validates ``moe_experts``' arguments; returns ``(MoEOptions, core.Plan)``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
    if gemm not in GEMMS:
        raise ValueError(f"gemm={gemm!r} is not one of {GEMMS}")
    check_bool("recompute", recompute)
    check_bool("check_ids", check_ids)
    check_bool("distinct_ids", distinct_ids)
    autocast = isinstance(x, torch.Tensor) and autocast_dtype(x) is not None
    N, D, E, F, K = validate_experts_inputs(x, topk_ids, topk_weights, w_up, w_down, autocast=autocast)
    options = MoEOptions(top_k=K, activation=activation, gemm=gemm, recompute=recompute,
                         max_tokens_per_expert=max_tokens_per_expert)
    return options, make_experts_plan(options.resolved_gemm(D, F), N, K, E, options.max_tokens_per_expert)


def make_experts_plan(gemm: str, num_tokens: int, top_k: int, num_experts: int,
                      max_tokens_per_expert: int | None = None) -> core.Plan:
    """The plan of a resolved ``gemm``: "grouped", "gathered" and "fused_dgrad" the dropless layout;
    "bmm" padded to ``max_tokens_per_expert`` rows per expert, by default twice the mean load, at
    most N*K."""
    if gemm == "bmm":
        if max_tokens_per_expert is not None:
            return core.Plan("bmm", max_tokens_per_expert)
        mean = -(-num_tokens * top_k // num_experts)
        return core.Plan("bmm", max(1, min(num_tokens * top_k, 2 * mean)))
    return core.Plan(gemm)


# ---------------------------------------------------------------------------------------------
# torch.compile: custom ops
# ---------------------------------------------------------------------------------------------


def _options(activation: str, recompute: bool, top_k: int) -> MoEOptions:
    return MoEOptions(top_k=top_k, activation=activation, recompute=recompute)


_NUM_FORWARD_RESULTS = len(core.ExpertsOutputs._fields) + len(core.ExpertsResiduals._fields) + 2  # + casts
_FORWARD_SCHEMA = (
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w_up, Tensor w_down, str activation, "
    "bool recompute, str gemm, int rows_per_expert, bool allow_grow, bool check_ids, bool distinct_ids) -> ("
    + ", ".join(["Tensor"] * _NUM_FORWARD_RESULTS) + ")"
)
_BACKWARD_SCHEMA = (
    "(Tensor x, Tensor topk_weights, Tensor w_up, Tensor w_down, Tensor assign_to_row, Tensor row_to_assign, "
    "Tensor expert_ends, Tensor h, Tensor w_up_cast, Tensor w_down_cast, Tensor? grad_out, str activation, "
    "bool recompute, str gemm) -> (Tensor, Tensor, Tensor, Tensor)"
)
FORWARD_OP = op_name("experts_forward", _FORWARD_SCHEMA, _BACKWARD_SCHEMA)


@torch.library.custom_op(FORWARD_OP, mutates_args=(), schema=_FORWARD_SCHEMA)
def experts_forward_op(
    x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_up: Tensor, w_down: Tensor, activation: str,
    recompute: bool, gemm: str, rows_per_expert: int, allow_grow: bool, check_ids: bool, distinct_ids: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(*core.ExpertsOutputs, *core.ExpertsResiduals, w_up_cast, w_down_cast)`` (the casts
    empty where the weight is in x's dtype, as ``ops.moe_forward``'s)."""
    options = _options(activation, recompute, topk_ids.shape[1])
    with _no_autocast(x.device.type):
        w_up_c, w_down_c = compute_weights(x, w_up, w_down)
        outputs, residuals, _ = core.experts_forward(
            x, topk_ids, topk_weights, w_up_c, w_down_c, options, core.Plan(gemm, rows_per_expert),
            allow_grow=allow_grow, check_ids=check_ids, distinct_ids=distinct_ids,
        )
    return (*outputs, *residuals, *cast_results(x, (w_up, w_down), (w_up_c, w_down_c)))


@experts_forward_op.register_fake
def _(x, topk_ids, topk_weights, w_up, w_down, activation, recompute, gemm, rows_per_expert, allow_grow,
      check_ids, distinct_ids):
    N, K = topk_ids.shape
    specs = core.experts_result_specs(N, x.shape[1], w_up.shape[0], K, w_up.shape[1], recompute,
                                      core.Plan(gemm, rows_per_expert))
    dtypes = {"input": x.dtype, "int32": torch.int32}
    return (*(x.new_empty(shape, dtype=dtypes[kind]) for shape, kind in specs),
            *fake_cast_results(x, (w_up, w_down)))


@torch.library.custom_op(op_name("experts_backward", _FORWARD_SCHEMA, _BACKWARD_SCHEMA), mutates_args=(),
                         schema=_BACKWARD_SCHEMA)
def experts_backward_op(
    x: Tensor, topk_weights: Tensor, w_up: Tensor, w_down: Tensor, assign_to_row: Tensor,
    row_to_assign: Tensor, expert_ends: Tensor, h: Tensor, w_up_cast: Tensor, w_down_cast: Tensor,
    grad_out: Optional[Tensor], activation: str, recompute: bool, gemm: str,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_x, grad_topk_weights, grad_w_up, grad_w_down)``, the weights' gradient in
    topk_weights' dtype, each expert weight's in its own dtype."""
    options = _options(activation, recompute, topk_weights.shape[1])
    E = w_up.shape[0]
    plan = core.Plan(gemm, row_to_assign.shape[0] // E if gemm == "bmm" else 0)
    residuals = core.ExpertsResiduals(assign_to_row, row_to_assign, expert_ends, h)
    w_up_c, w_down_c = weights_used(x, (w_up, w_down), (w_up_cast, w_down_cast))
    into = weight_grads_into(core.ExpertsGrads, x, (w_up_c, w_down_c), (w_up.dtype, w_down.dtype))
    with _no_autocast(x.device.type):
        grad_x, grad_w, grad_w_up, grad_w_down = core.experts_backward(
            x, topk_weights, w_up_c, w_down_c, residuals, grad_out, options, plan, into=into)
    return grad_x, grad_w.to(topk_weights.dtype), grad_w_up, grad_w_down


@experts_backward_op.register_fake
def _(x, topk_weights, w_up, w_down, *args):
    return (torch.empty_like(x), torch.empty_like(topk_weights), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _setup_context(ctx, inputs, output):
    x, _, topk_weights, w_up, w_down, activation, recompute, gemm = inputs[:8]
    ctx.option_args = (activation, recompute, gemm)
    ctx.save_for_backward(x, topk_weights, w_up, w_down, *output[2:])  # the residuals, then the casts
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *unused):
    grads = experts_backward_op(*ctx.saved_tensors, grad_out, *ctx.option_args)
    return grads[0], None, *grads[1:], *([None] * 7)


torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)


class _EagerExperts(torch.autograd.Function):
    """The same core without the custom-op dispatch (used outside tracing)."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, options, plan, allow_grow, check_ids,
                distinct_ids):
        with _no_autocast(x.device.type):
            w_up_c, w_down_c = compute_weights(x, w_up, w_down)
            outputs, residuals, plan = core.experts_forward(
                x, topk_ids, topk_weights, w_up_c, w_down_c, options, plan, allow_grow=allow_grow,
                check_ids=check_ids, distinct_ids=distinct_ids)
        ctx.options, ctx.plan = options, plan
        ctx.weight_dtypes = (w_up.dtype, w_down.dtype)
        ctx.save_for_backward(x, topk_weights, w_up_c, w_down_c, *residuals)
        ctx.mark_non_differentiable(outputs.tokens_per_expert)
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        x, topk_weights, w_up, w_down, *residuals = ctx.saved_tensors
        with _no_autocast(x.device.type):
            grad_x, grad_w, grad_w_up, grad_w_down = core.experts_backward(
                x, topk_weights, w_up, w_down, core.ExpertsResiduals(*residuals), grad_out, ctx.options,
                ctx.plan, into=weight_grads_into(core.ExpertsGrads, x, (w_up, w_down), ctx.weight_dtypes))
        return grad_x, None, grad_w.to(topk_weights.dtype), grad_w_up, grad_w_down, *([None] * 5)


__all__ = ["moe_experts", "validate_experts_inputs"]
