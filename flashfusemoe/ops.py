"""Torch wiring of the functional core: two ``torch.library.custom_op``s and their autograd.

``custom_op`` + ``register_fake`` + ``register_autograd`` is what lets ``torch.compile``
(fullgraph) trace a model containing the layer, forward and backward. The ops' schemas are
derived from ``MoEOptions``' fields, so an option added there reaches the ops with no edit here.
"""

import contextlib
import dataclasses

import torch

from flashfusemoe import core
from flashfusemoe.config import MoEOptions
from flashfusemoe.kernels import compute_dtype

# Schema type of each MoEOptions field annotation (the dataclass's annotations are strings).
_SCHEMA_TYPES = {"int": "int", "bool": "bool", "float": "float", "str": "str",
                 "int | None": "int?", "float | None": "float?"}
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(MoEOptions))
_CONFIG_SCHEMA = ", ".join(
    [f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(MoEOptions)]
    + ["str plan_gemm", "int plan_rows_per_expert"]
)
_FORWARD_TENSORS = ("x", "router_weight", "w_up", "w_down", "expert_bias")
_FORWARD_ARGS = (*_FORWARD_TENSORS, *OPTION_NAMES, "plan_gemm", "plan_rows_per_expert", "allow_grow")
_NUM_FORWARD_RESULTS = len(core.Outputs._fields) + len(core.Residuals._fields)


def _config_args(options: MoEOptions, plan: core.Plan) -> tuple:
    """The options and the plan as the ops' trailing primitive arguments."""
    return (*(getattr(options, name) for name in OPTION_NAMES), plan.gemm, plan.rows_per_expert)


def _config_from(named: dict) -> tuple[MoEOptions, core.Plan]:
    options = MoEOptions(**{name: named[name] for name in OPTION_NAMES})
    return options, core.Plan(named["plan_gemm"], named["plan_rows_per_expert"])


def _no_autocast(device_type: str):
    """Autocast off inside the op (the inputs are cast already); a no-op context when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


_RESULTS = "(" + ", ".join(["Tensor"] * _NUM_FORWARD_RESULTS) + ")"


@torch.library.custom_op(
    "flashfusemoe::moe_forward", mutates_args=(),
    schema=f"(Tensor x, Tensor router_weight, Tensor w_up, Tensor w_down, Tensor? expert_bias, "
           f"{_CONFIG_SCHEMA}, bool allow_grow) -> {_RESULTS}",
)
def moe_forward(*args):
    """Returns ``(*core.Outputs, *core.Residuals)``."""
    named = dict(zip(_FORWARD_ARGS, args, strict=True))
    options, plan = _config_from(named)
    tensors = [named[name] for name in _FORWARD_TENSORS]
    with _no_autocast(named["x"].device.type):
        outputs, residuals, _ = core.forward(*tensors, options, plan, allow_grow=named["allow_grow"])
    return (*outputs, *residuals)


@moe_forward.register_fake
def _(*args):
    named = dict(zip(_FORWARD_ARGS, args, strict=True))
    options, plan = _config_from(named)
    x, w_up = named["x"], named["w_up"]
    specs = core.result_specs(x.shape[0], x.shape[1], w_up.shape[0], w_up.shape[1], options, plan)
    dtypes = {"input": x.dtype, "route": compute_dtype(x.dtype), "int32": torch.int32}
    return tuple(x.new_empty(shape, dtype=dtypes[kind]) for shape, kind in specs)


_BACKWARD_TENSORS = ("x", "router_weight", "w_up", "w_down", "logits", *core.Residuals._fields)
_BACKWARD_ARGS = (*_BACKWARD_TENSORS, "grad_out", "grad_logits", *OPTION_NAMES, "plan_gemm",
                  "plan_rows_per_expert")


@torch.library.custom_op(
    "flashfusemoe::moe_backward", mutates_args=(),
    schema="(" + ", ".join(f"Tensor {name}" for name in _BACKWARD_TENSORS)
           + f", Tensor? grad_out, Tensor? grad_logits, {_CONFIG_SCHEMA}) -> "
           + "(" + ", ".join(["Tensor"] * len(core.Grads._fields)) + ")",
)
def moe_backward(*args):
    """Returns ``core.Grads``' four tensors."""
    named = dict(zip(_BACKWARD_ARGS, args, strict=True))
    options, plan = _config_from(named)
    residuals = core.Residuals(*(named[name] for name in core.Residuals._fields))
    x = named["x"]
    with _no_autocast(x.device.type):
        return tuple(core.backward(x, named["router_weight"], named["w_up"], named["w_down"], named["logits"],
                                   residuals, named["grad_out"], named["grad_logits"], options, plan))


@moe_backward.register_fake
def _(x, router_weight, w_up, w_down, *args):
    return (torch.empty_like(x), torch.empty_like(router_weight), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _setup_context(ctx, inputs, output):
    named = dict(zip(_FORWARD_ARGS, inputs, strict=True))
    ctx.config_args = _config_args(*_config_from(named))
    outputs = core.Outputs(*output[: len(core.Outputs._fields)])
    ctx.save_for_backward(*(named[name] for name in _FORWARD_TENSORS[:4]), outputs.logits,
                          *output[len(core.Outputs._fields):])
    # Residuals carry no gradient, and unused outputs must not be materialised as zero tensors
    # (a zero [R, 2F] gradient for h would cost a full memset).
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_logits, *unused):
    grads = moe_backward(*ctx.saved_tensors, grad_out, grad_logits, *ctx.config_args)
    return (*grads, *([None] * (len(_FORWARD_ARGS) - len(grads))))


torch.library.register_autograd("flashfusemoe::moe_forward", _backward, setup_context=_setup_context)


class _EagerMoE(torch.autograd.Function):
    """The same core without the custom-op dispatch, whose Python overhead per call exceeds the
    whole layer's GPU time at the seed shape (``docs/benchmarks.md``). Used outside tracing."""

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
                     allow_grow: bool) -> core.Outputs:
    """Runs the fused MoE: the custom op when traced by torch.compile, else ``_EagerMoE``.

    Both call ``core.forward``/``core.backward``.
    """
    if torch.compiler.is_compiling():
        results = moe_forward(x, router_weight, w_up, w_down, expert_bias, *_config_args(options, plan),
                              allow_grow)
    else:
        results = _EagerMoE.apply(x, router_weight, w_up, w_down, expert_bias, options, plan, allow_grow)
    return core.Outputs(*results[: len(core.Outputs._fields)])
