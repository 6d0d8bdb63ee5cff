"""``fused_moe`` on JAX arrays: the torch functional core run inside XLA buffer callbacks.

A ``jax.custom_vjp`` whose forward and backward each call ``flashfusemoe.core`` through one XLA
custom call (``callback.python_callback``): XLA's buffers are viewed as torch tensors (zero-copy),
torch launches on XLA's own stream, and the core writes its results straight into
XLA's output buffers (its destinations). Residuals leave the forward as extra JAX outputs, so
nothing torch-side outlives a callback. ``docs/design.md`` (JAX bridge) covers the shapes, the
``gemm="bmm"`` overflow, GPU memory, and ``vmap``/``shard_map``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from flashfusemoe import core
from flashfusemoe.config import (
    MoEOptions,
    check_aux_shapes,
    check_bias_update_args,
    check_bool,
    make_options,
    signature_with_options,
    validate_inputs,
)
from flashfusemoe.functional import make_plan
from jax_bridge.callback import _align_varying, _as_torch, _standin, _TorchScope, _vary, _vma, python_callback

__all__ = ["aux_losses", "fused_moe", "moe"]



@signature_with_options
def fused_moe(x: jax.Array, router_weight: jax.Array, w_up: jax.Array, w_down: jax.Array, top_k: int, *,
              expert_bias: jax.Array | None = None, return_aux: bool = False, ep_axis: str | None = None,
              **options: Any) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Top-k routed GLU mixture of experts on JAX arrays, same layouts as ``flashfusemoe.fused_moe``.

    x [..., D]; router_weight [E, D]; w_up [E, 2F, D] (rows 0:F gate, F:2F up); w_down [E, D, F];
    expert_bias [E] float32/float64 (selection only, zero gradient); ``top_k`` and ``options``:
    ``MoEOptions``' fields. Returns ``out`` shaped like x, or ``(out, aux)`` with
    ``aux = {load_balance_loss, z_loss, tokens_per_expert [E] int32, dropped_tokens [] int32}``;
    the losses are differentiable, computed by JAX ops from the op's logits (equal to torch's to
    float rounding, not bit for bit; everything else is bit-identical to torch-native).
    ``ep_axis``: inside ``shard_map``, the mesh axis of expert parallelism; w_up/w_down then hold
    this device's E/W experts (``jax_bridge.parallel``).
    """
    options = make_options(top_k, options, "fused_moe")
    return moe(x, router_weight, w_up, w_down, options, expert_bias=expert_bias, return_aux=return_aux,
               ep_axis=ep_axis)


def moe(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None, return_aux=False,
        ep_axis=None):
    """``fused_moe`` with the options already in a ``MoEOptions``."""
    check_bool("return_aux", return_aux)
    if ep_axis is not None:
        from jax_bridge.parallel import ep_fused_moe

        return ep_fused_moe(x, router_weight, w_up, w_down, options, expert_bias=expert_bias, axis=ep_axis,
                            return_aux=return_aux)
    x, router_weight, w_up, w_down, expert_bias, plan = _validate_and_plan(
        x, router_weight, w_up, w_down, expert_bias, options
    )
    lead_shape, D = x.shape[:-1], x.shape[-1]
    args = _align_varying(x.reshape(-1, D), router_weight, w_up, w_down, expert_bias)
    out, logits, tokens_per_expert, dropped = _moe(options, plan, *args)
    out = out.reshape(*lead_shape, D)
    if not return_aux:
        return out
    aux = _aux_losses(logits, tokens_per_expert, options.score_func)
    aux["tokens_per_expert"] = tokens_per_expert
    aux["dropped_tokens"] = dropped
    return out, aux


def _check_arrays_and_loads(named: dict) -> None:
    """Every entry an array, ``named["tokens_per_expert"]`` integer or floating."""
    for name, a in named.items():
        if not isinstance(a, (jax.Array, np.ndarray)):
            raise TypeError(f"{name} must be a jax.Array, got {type(a).__name__}")
    dtype = named["tokens_per_expert"].dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"tokens_per_expert must be integer or floating, got {dtype}")


def aux_losses(logits: jax.Array, tokens_per_expert: jax.Array, score_func: str) -> dict[str, jax.Array]:
    """Load-balance and z losses from router logits [N, E], as ``flashfusemoe.aux_losses``."""
    _check_arrays_and_loads({"logits": logits, "tokens_per_expert": tokens_per_expert})
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
    check_aux_shapes(tuple(logits.shape), tuple(tokens_per_expert.shape), score_func)
    return _aux_losses(logits, tokens_per_expert, score_func)


def update_expert_bias(expert_bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """``flashfusemoe.update_expert_bias``, pure: returns ``expert_bias + rate * sign(mean - load)``.

    ``expert_bias`` [E] float32/float64, ``tokens_per_expert`` [E] integer or floating, ``rate`` a
    float > 0. The sign is taken of ``sum(load) - E * load[e]`` in float64 under
    ``jax_enable_x64``, else float32: equal to the torch function's (bit for bit) while the loads
    sum below 2**53, or 2**24 in float32.
    """
    _check_arrays_and_loads({"expert_bias": expert_bias, "tokens_per_expert": tokens_per_expert})
    check_bias_update_args(tuple(expert_bias.shape), jnp.dtype(expert_bias.dtype).name,
                           tuple(tokens_per_expert.shape), rate)
    loads = jnp.asarray(tokens_per_expert).astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    direction = jnp.sign(loads.sum() - loads.shape[0] * loads).astype(expert_bias.dtype)
    return expert_bias + jnp.asarray(rate, expert_bias.dtype) * direction


def _aux_losses(logits, tokens_per_expert, score_func: str) -> dict:
    N, E = logits.shape
    if N == 0:
        zero = logits.sum() * 0
        return {"load_balance_loss": zero, "z_loss": zero}
    if score_func == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / scores.sum(axis=-1, keepdims=True)
    fraction = tokens_per_expert.astype(probs.dtype) / N
    load_balance = E * jnp.sum(fraction * probs.mean(axis=0))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    return {"load_balance_loss": load_balance, "z_loss": z_loss}


# ---------------------------------------------------------------------------------------------
# Validation and plan: torch's own checks, run on shape-only stand-ins
# ---------------------------------------------------------------------------------------------


def _validate_and_plan(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions):
    """Same checks and messages as ``flashfusemoe.fused_moe``; returns jnp arrays and the plan."""
    named = {"x": x, "router_weight": router_weight, "w_up": w_up, "w_down": w_down}
    if expert_bias is not None:
        named["expert_bias"] = expert_bias
    standins = {name: _standin(name, a) for name, a in named.items()}
    try:
        D, _, _ = validate_inputs(
            *(standins[n] for n in ("x", "router_weight", "w_up", "w_down")),
            standins.get("expert_bias"),
            options,
        )
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace(", device meta", "")) from None
    plan = make_plan(options, standins["x"].reshape(-1, D).shape[0], standins["router_weight"].shape[0], D,
                     standins["w_down"].shape[2])
    arrays = [None if a is None else jnp.asarray(a) for a in (x, router_weight, w_up, w_down, expert_bias)]
    return (*arrays, plan)


def _forward_callback(options, plan, ctx, outs, x, router_weight, w_up, w_down, expert_bias):
    with _TorchScope(ctx, x):
        tensors = [_as_torch(b) for b in (x, router_weight, w_up, w_down)]
        bias = None if expert_bias is None else _as_torch(expert_bias)
        dsts = [_as_torch(b) for b in outs]
        n_out = len(core.Outputs._fields)
        core.forward(*tensors, bias, options, plan, allow_grow=False,
                     outputs_into=core.Outputs(*dsts[:n_out]), residuals_into=core.Residuals(*dsts[n_out:]))


def _backward_callback(
    options, plan, ctx, outs, x, router_weight, w_up, w_down, logits, residuals, grad_out, grad_logits
):
    with _TorchScope(ctx, x):
        tensors = [_as_torch(b) for b in (x, router_weight, w_up, w_down, logits)]
        saved = core.Residuals(*(_as_torch(b) for b in residuals))
        into = core.Grads(*(_as_torch(b) for b in outs))
        core.backward(*tensors, saved, _as_torch(grad_out), _as_torch(grad_logits), options, plan, into=into)


def _forward_shapes(x, router_weight, w_up, options: MoEOptions, plan: core.Plan):
    """``(*core.Outputs, *core.Residuals)`` as ``jax.ShapeDtypeStruct``s (``core.result_specs``)."""
    specs = core.result_specs(x.shape[0], x.shape[1], w_up.shape[0], w_up.shape[1], options, plan)
    route = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    dtypes = {"input": x.dtype, "route": route, "int32": jnp.int32}
    return tuple(jax.ShapeDtypeStruct(shape, dtypes[kind]) for shape, kind in specs)


def _forward_call(options, plan, x, router_weight, w_up, w_down, expert_bias):
    """Runs the core forward. Returns ``(*core.Outputs, *core.Residuals)`` as JAX arrays."""
    call = python_callback(
        functools.partial(_forward_callback, options, plan),
        _forward_shapes(x, router_weight, w_up, options, plan),
    )
    results = call(x, router_weight, w_up, w_down, expert_bias)
    axes = frozenset().union(*(_vma(a) for a in (x, router_weight, w_up, w_down)))
    return tuple(_vary(r, axes) for r in results)


def _backward_call(options, plan, x, router_weight, w_up, w_down, logits, residuals, grad_out, grad_logits):
    primals = (x, router_weight, w_up, w_down)
    call = python_callback(
        functools.partial(_backward_callback, options, plan),
        tuple(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in primals),
    )
    grads = call(x, router_weight, w_up, w_down, logits, tuple(residuals), grad_out, grad_logits)
    return tuple(_vary(g, _vma(p)) for g, p in zip(grads, primals))


# ---------------------------------------------------------------------------------------------
# custom_vjp (outside) over a custom_vmap primal (folds a shared-weight batch into tokens)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _primal(options: MoEOptions, plan: core.Plan):
    """``(x, rw, w_up, w_down, bias) -> (out, logits, tokens_per_expert, dropped, topk_ids)``."""

    def unbatched(x, router_weight, w_up, w_down, expert_bias):
        results = _forward_call(options, plan, x, router_weight, w_up, w_down, expert_bias)
        return results[:5]

    @custom_vmap
    def primal(x, router_weight, w_up, w_down, expert_bias):
        return unbatched(x, router_weight, w_up, w_down, expert_bias)

    @primal.def_vmap
    def _(axis_size, in_batched, x, router_weight, w_up, w_down, expert_bias):
        x_batched = in_batched[0]
        weights_batched = any(jax.tree.leaves(in_batched[1:]))
        # Capacity competes across a call's tokens and the padded layout is sized per call,
        # so only the dropless grouped layout folds exactly.
        if not x_batched or weights_batched or plan.gemm == "bmm" or options.capacity_factor is not None:
            in_axes = [jax.tree.map(lambda b: 0 if b else None, flag) for flag in in_batched]
            outs = jax.vmap(unbatched, in_axes=in_axes)(x, router_weight, w_up, w_down, expert_bias)
            return outs, (True,) * 5
        B, N, D = x.shape
        E, K = router_weight.shape[0], options.top_k
        out, logits, _, _, topk_ids = primal(x.reshape(B * N, D), router_weight, w_up, w_down, expert_bias)
        ids = topk_ids.reshape(B, N * K)
        tokens_per_expert = jnp.zeros((B, E), jnp.int32).at[jnp.arange(B)[:, None], ids].add(1)
        dropped = jnp.zeros((B,), jnp.int32)  # dropless: no capacity, the grouped layout never overflows
        outs = (
            out.reshape(B, N, D),
            logits.reshape(B, N, E),
            tokens_per_expert,
            dropped,
            topk_ids.reshape(B, N, K),
        )
        return outs, (True,) * 5

    return primal


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _moe(options, plan, x, router_weight, w_up, w_down, expert_bias):
    """``(out [N, D], logits [N, E], tokens_per_expert [E], dropped [])``, differentiable."""
    return _primal(options, plan)(x, router_weight, w_up, w_down, expert_bias)[:4]


def _moe_fwd(options, plan, x, router_weight, w_up, w_down, expert_bias):
    results = _forward_call(options, plan, x, router_weight, w_up, w_down, expert_bias)
    saved = (x, router_weight, w_up, w_down, expert_bias, results[1], results[4:])
    return results[:4], saved


def _moe_bwd(options, plan, saved, cotangents):
    x, router_weight, w_up, w_down, expert_bias, logits, residuals = saved
    grad_out, grad_logits = cotangents[:2]  # tokens_per_expert and dropped are integers
    grads = _backward_call(
        options, plan, x, router_weight, w_up, w_down, logits, residuals, grad_out, grad_logits
    )
    return (*grads, None if expert_bias is None else jnp.zeros_like(expert_bias))


_moe.defvjp(_moe_fwd, _moe_bwd)
