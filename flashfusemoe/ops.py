"""Torch wiring of the functional core: two ``torch.library.custom_op``s and their autograd.

``custom_op`` + ``register_fake`` + ``register_autograd`` is what lets ``torch.compile``
(fullgraph) trace a model containing the layer, forward and backward. The ops' schemas are
derived from ``MoEOptions``' fields, so an option added there reaches the ops with no edit here.
"""

import contextlib
import dataclasses
import hashlib

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
# (*core.Outputs, *core.Residuals, w_up and w_down in x's dtype: see compute_weights)
_NUM_FORWARD_RESULTS = len(core.Outputs._fields) + len(core.Residuals._fields) + 2


def op_name(name: str, *schemas: str) -> str:
    """``flashfusemoe::{name}_{digest of schemas}``. torch.compile's FX-graph and AOTAutograd caches
    know a custom op by its name alone (not its schema), so code compiled against an older schema of
    an op pair (e.g. one output fewer) would be reused after an upgrade and fail; a schema change
    gives the pair new names instead."""
    digest = hashlib.sha1("\n".join(schemas).encode()).hexdigest()[:8]
    return f"flashfusemoe::{name}_{digest}"


def _config_args(options: MoEOptions, plan: core.Plan) -> tuple:
    """The options and the plan as the ops' trailing primitive arguments."""
    return (*(getattr(options, name) for name in OPTION_NAMES), plan.gemm, plan.rows_per_expert)


def _config_from(named: dict) -> tuple[MoEOptions, core.Plan]:
    options = MoEOptions(**{name: named[name] for name in OPTION_NAMES})
    return options, core.Plan(named["plan_gemm"], named["plan_rows_per_expert"])


# Mixed precision. Under autocast, float32 expert weights enter the ops as they are and are cast to
# x's dtype inside (``compute_weights``), so that their gradients come back from the weight-gradient
# kernels in float32 directly (their accumulator, ``weight_grads_into``) instead of as 16-bit
# gradients that autograd's cast node widens again. The custom ops return the casts as residuals
# (``cast_results``: empty where nothing was cast) and their backward takes them back (``weights_used``).


def autocast_weights(dtype: torch.dtype, *weights: torch.Tensor) -> list[torch.Tensor]:
    """The expert weights as the op takes them under autocast to ``dtype``: float32 ones as they
    are (cast inside the op), others cast here."""
    return [w if w.dtype == torch.float32 else w.to(dtype) for w in weights]


def compute_weights(x: torch.Tensor, *weights: torch.Tensor) -> list[torch.Tensor]:
    """Each weight in ``x``'s dtype (a cast inside the op where it differs)."""
    return [w if w.dtype == x.dtype else w.to(x.dtype) for w in weights]


def cast_results(x: torch.Tensor, weights, used) -> tuple[torch.Tensor, ...]:
    """The op's cast-weight results: each ``used`` weight that is a cast, else an empty tensor."""
    return tuple(u if u is not w else x.new_empty(0) for u, w in zip(used, weights, strict=True))


def fake_cast_results(x: torch.Tensor, weights) -> tuple[torch.Tensor, ...]:
    """``cast_results``' shapes for the ops' fake (meta) implementations."""
    return tuple(x.new_empty(w.shape if w.dtype != x.dtype else (0,)) for w in weights)


def weights_used(x: torch.Tensor, weights, casts) -> list[torch.Tensor]:
    """In a backward op: the weights the forward used (its casts where it cast)."""
    return [c if w.dtype != x.dtype else w for w, c in zip(weights, casts, strict=True)]


def weight_grads_into(grads_type, x: torch.Tensor, weights, dtypes):
    """``grads_type(None, None, grad_w_up, grad_w_down)`` (``core.Grads`` or ``core.ExpertsGrads``):
    float32 destinations for the gradients of ``weights`` (as used, in x's dtype) that the forward
    cast from ``dtypes``, None for the others; None where nothing was cast."""
    if all(dtype == x.dtype for dtype in dtypes):
        return None
    return grads_type(None, None, *(None if dtype == x.dtype else x.new_empty(w.shape, dtype=dtype)
                                    for w, dtype in zip(weights, dtypes, strict=True)))


def _no_autocast(device_type: str):
    """Autocast off inside the op (the inputs are cast already); a no-op context when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


_BACKWARD_TENSORS = ("x", "router_weight", "w_up", "w_down", "logits", *core.Residuals._fields, "w_up_cast",
                     "w_down_cast")
_BACKWARD_ARGS = (*_BACKWARD_TENSORS, "grad_out", "grad_logits", *OPTION_NAMES, "plan_gemm",
                  "plan_rows_per_expert")
_FORWARD_SCHEMA = (
    "(Tensor x, Tensor router_weight, Tensor w_up, Tensor w_down, Tensor? expert_bias, "
    f"{_CONFIG_SCHEMA}, bool allow_grow) -> (" + ", ".join(["Tensor"] * _NUM_FORWARD_RESULTS) + ")"
)
_BACKWARD_SCHEMA = (
    "(" + ", ".join(f"Tensor {name}" for name in _BACKWARD_TENSORS)
    + f", Tensor? grad_out, Tensor? grad_logits, {_CONFIG_SCHEMA}) -> "
    + "(" + ", ".join(["Tensor"] * len(core.Grads._fields)) + ")"
)
FORWARD_OP = op_name("moe_forward", _FORWARD_SCHEMA, _BACKWARD_SCHEMA)


@torch.library.custom_op(FORWARD_OP, mutates_args=(), schema=_FORWARD_SCHEMA)
def moe_forward(*args):
    """Returns ``(*core.Outputs, *core.Residuals, w_up_cast, w_down_cast)``, each cast weight empty
    where the weight is in x's dtype already (``compute_weights``)."""
    named = dict(zip(_FORWARD_ARGS, args, strict=True))
    options, plan = _config_from(named)
    x, router_weight, w_up, w_down, expert_bias = (named[name] for name in _FORWARD_TENSORS)
    with _no_autocast(x.device.type):
        w_up_c, w_down_c = compute_weights(x, w_up, w_down)
        outputs, residuals, _ = core.forward(x, router_weight, w_up_c, w_down_c, expert_bias, options, plan,
                                             allow_grow=named["allow_grow"])
    return (*outputs, *residuals, *cast_results(x, (w_up, w_down), (w_up_c, w_down_c)))


@moe_forward.register_fake
def _(*args):
    named = dict(zip(_FORWARD_ARGS, args, strict=True))
    options, plan = _config_from(named)
    x, w_up = named["x"], named["w_up"]
    specs = core.result_specs(x.shape[0], x.shape[1], w_up.shape[0], w_up.shape[1], options, plan)
    dtypes = {"input": x.dtype, "route": compute_dtype(x.dtype), "int32": torch.int32}
    return (*(x.new_empty(shape, dtype=dtypes[kind]) for shape, kind in specs),
            *fake_cast_results(x, (w_up, named["w_down"])))


@torch.library.custom_op(op_name("moe_backward", _FORWARD_SCHEMA, _BACKWARD_SCHEMA), mutates_args=(),
                         schema=_BACKWARD_SCHEMA)
def moe_backward(*args):
    """Returns ``core.Grads``' four tensors, each in its input's dtype (float32 for the gradient of a
    float32 weight cast in the forward)."""
    named = dict(zip(_BACKWARD_ARGS, args, strict=True))
    options, plan = _config_from(named)
    residuals = core.Residuals(*(named[name] for name in core.Residuals._fields))
    x, w_up, w_down = named["x"], named["w_up"], named["w_down"]
    w_up_c, w_down_c = weights_used(x, (w_up, w_down), (named["w_up_cast"], named["w_down_cast"]))
    into = weight_grads_into(core.Grads, x, (w_up_c, w_down_c), (w_up.dtype, w_down.dtype))
    with _no_autocast(x.device.type):
        return tuple(core.backward(x, named["router_weight"], w_up_c, w_down_c, named["logits"], residuals,
                                   named["grad_out"], named["grad_logits"], options, plan, into=into))


@moe_backward.register_fake
def _(x, router_weight, w_up, w_down, *args):
    return (torch.empty_like(x), torch.empty_like(router_weight), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _setup_context(ctx, inputs, output):
    named = dict(zip(_FORWARD_ARGS, inputs, strict=True))
    ctx.config_args = _config_args(*_config_from(named))
    outputs = core.Outputs(*output[: len(core.Outputs._fields)])
    ctx.save_for_backward(*(named[name] for name in _FORWARD_TENSORS[:4]), outputs.logits,
                          *output[len(core.Outputs._fields):])  # the residuals, then the casts
    # Residuals carry no gradient, and unused outputs must not be materialised as zero tensors
    # (a zero [R, 2F] gradient for h would cost a full memset).
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_logits, *unused):
    grads = moe_backward(*ctx.saved_tensors, grad_out, grad_logits, *ctx.config_args)
    return (*grads, *([None] * (len(_FORWARD_ARGS) - len(grads))))


torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)


class _EagerMoE(torch.autograd.Function):
    """The same core without the custom-op dispatch, whose Python overhead per call exceeds the
    whole layer's GPU time at the seed shape (``docs/benchmarks.md``). Used outside tracing."""

    @staticmethod
    def forward(ctx, x, router_weight, w_up, w_down, expert_bias, options, plan, allow_grow):
        with _no_autocast(x.device.type):
            w_up_c, w_down_c = compute_weights(x, w_up, w_down)
            outputs, residuals, plan = core.forward(x, router_weight, w_up_c, w_down_c, expert_bias, options,
                                                    plan, allow_grow=allow_grow)
        ctx.options, ctx.plan = options, plan
        ctx.weight_dtypes = (w_up.dtype, w_down.dtype)
        ctx.save_for_backward(x, router_weight, w_up_c, w_down_c, outputs.logits, *residuals)
        ctx.mark_non_differentiable(*outputs[2:])
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_out, grad_logits, *unused):
        x, router_weight, w_up, w_down, logits, *residuals = ctx.saved_tensors
        into = weight_grads_into(core.Grads, x, (w_up, w_down), ctx.weight_dtypes)
        with _no_autocast(x.device.type):
            grads = core.backward(x, router_weight, w_up, w_down, logits, core.Residuals(*residuals),
                                  grad_out, grad_logits, ctx.options, ctx.plan, into=into)
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
