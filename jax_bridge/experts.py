"""``moe_experts`` on JAX arrays: the twin of ``flashfusemoe.moe_experts``.

The forward and backward of a ``jax.custom_vjp`` call ``flashfusemoe.core.experts_forward`` /
``experts_backward`` (what torch's ``moe_experts`` runs) inside XLA buffer callbacks, through the
machinery of ``jax_bridge.ops`` (DLPack views of XLA's buffers, XLA's stream on GPU, torch modes
reset in the callback), so the results are bit-identical to torch's. Residuals leave the forward
as extra JAX outputs. Shapes are static: ``gemm="auto"`` resolves as in torch; with ``gemm="bmm"`` an
expert overflowing the padded layout raises ``CapacityOverflowError`` in the callback (reported
by JAX as a ``JaxRuntimeError`` naming it). ``check_ids=True`` checks the id range inside the
forward callback (one sync of XLA's stream with the host) and a bad id raises ``ValueError``
there, likewise reported as a ``JaxRuntimeError``; ``check_ids=False`` leaves only the
device-side assert. Transformations: ``jit``, ``grad``/``vjp``, ``vmap`` (one call per batch
element) and ``shard_map`` (replicated weights get gradients summed over the devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flashfusemoe import core
from flashfusemoe.config import FLOAT_DTYPES
from flashfusemoe.experts import experts_plan
from jax_bridge.callback import _align_varying, _as_torch, _TorchScope, _vary, _vma, python_callback

__all__ = ["moe_experts"]

_ID_DTYPES = (jnp.int32, jnp.int64)


def moe_experts(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, w_up: jax.Array,
                w_down: jax.Array, *, activation: str = "swiglu", gemm: str = "auto", recompute: bool = False,
                check_ids: bool = True, distinct_ids: bool = False,
                max_tokens_per_expert: int | None = None) -> jax.Array:
    """GLU experts on given routing, as ``flashfusemoe.moe_experts``, on JAX arrays.

    x [N, D]; topk_ids [N, K] int32 (int64 with x64 on) in [0, E); topk_weights [N, K] floating;
    w_up [E, 2F, D] (rows 0:F gate, F:2F up); w_down [E, D, F]. Returns ``out`` [N, D] of x's
    dtype; differentiable in x, topk_weights, w_up and w_down (topk_ids gets no cotangent).
    With ``gemm="bmm"`` the padded layout cannot grow inside XLA: an expert with more rows than
    ``max_tokens_per_expert`` (default twice the mean load) raises ``CapacityOverflowError``.
    """
    standins = {name: _standin(name, a) for name, a in
                (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("w_up", w_up),
                 ("w_down", w_down))}
    try:
        options, plan = experts_plan(*standins.values(), activation=activation, gemm=gemm,
                                     recompute=recompute, check_ids=check_ids, distinct_ids=distinct_ids,
                                     max_tokens_per_expert=max_tokens_per_expert)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace(", device meta", "").replace("torch.", "")) from None
    args = _align_varying(*(jnp.asarray(a) for a in (x, topk_ids, topk_weights, w_up, w_down)))
    return _experts(options, plan, (check_ids, distinct_ids), *args)


def _standin(name: str, a) -> torch.Tensor:
    """A storage-less ``meta`` tensor with ``a``'s shape and dtype (ints allowed for topk_ids)."""
    if not isinstance(a, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array, got {type(a).__name__}")
    dtype = getattr(torch, jnp.dtype(a.dtype).name, None)
    if not isinstance(dtype, torch.dtype):
        expected = "int32 or int64" if name == "topk_ids" else f"a floating dtype in {FLOAT_DTYPES}"
        raise TypeError(f"{name} must have {expected}, got {a.dtype}")
    return torch.empty(a.shape, dtype=dtype, device="meta")


def _forward_callback(options, plan, checks, ctx, outs, x, topk_ids, topk_weights, w_up, w_down):
    with _TorchScope(ctx, x):
        tensors = [_as_torch(b) for b in (x, topk_ids, topk_weights, w_up, w_down)]
        dsts = [_as_torch(b) for b in outs]
        n_out = len(core.ExpertsOutputs._fields)
        core.experts_forward(*tensors, options, plan, allow_grow=False, check_ids=checks[0],
                             distinct_ids=checks[1], outputs_into=core.ExpertsOutputs(*dsts[:n_out]),
                             residuals_into=core.ExpertsResiduals(*dsts[n_out:]))


def _backward_callback(options, plan, ctx, outs, x, topk_weights, w_up, w_down, residuals, grad_out):
    with _TorchScope(ctx, x):
        tensors = [_as_torch(b) for b in (x, topk_weights, w_up, w_down)]
        saved = core.ExpertsResiduals(*(_as_torch(b) for b in residuals))
        into = core.ExpertsGrads(*(_as_torch(b) for b in outs))
        core.experts_backward(*tensors, saved, _as_torch(grad_out), options, plan, into=into)


def _forward_call(options, plan, checks, x, topk_ids, topk_weights, w_up, w_down):
    N, K = topk_ids.shape
    specs = core.experts_result_specs(N, x.shape[1], w_up.shape[0], K, w_up.shape[1], options.recompute, plan)
    dtypes = {"input": x.dtype, "int32": jnp.int32}
    call = python_callback(
        functools.partial(_forward_callback, options, plan, checks),
        tuple(jax.ShapeDtypeStruct(shape, dtypes[kind]) for shape, kind in specs),
    )
    results = call(x, topk_ids, topk_weights, w_up, w_down)
    axes = frozenset().union(*(_vma(a) for a in (x, topk_ids, topk_weights, w_up, w_down)))
    return tuple(_vary(r, axes) for r in results)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _experts(options, plan, checks, x, topk_ids, topk_weights, w_up, w_down):
    """checks: (check_ids, distinct_ids)."""
    return _forward_call(options, plan, checks, x, topk_ids, topk_weights, w_up, w_down)[0]


def _experts_fwd(options, plan, checks, x, topk_ids, topk_weights, w_up, w_down):
    results = _forward_call(options, plan, checks, x, topk_ids, topk_weights, w_up, w_down)
    return results[0], (x, topk_ids, topk_weights, w_up, w_down, results[2:])


def _experts_bwd(options, plan, checks, saved, grad_out):
    x, topk_ids, topk_weights, w_up, w_down, residuals = saved
    primals = (x, topk_weights, w_up, w_down)
    call = python_callback(
        functools.partial(_backward_callback, options, plan),
        tuple(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in primals),
    )
    grads = call(x, topk_weights, w_up, w_down, tuple(residuals), grad_out)
    grad_x, grad_w, grad_w_up, grad_w_down = (_vary(g, _vma(p)) for g, p in zip(grads, primals))
    return grad_x, None, grad_w, grad_w_up, grad_w_down


_experts.defvjp(_experts_fwd, _experts_bwd)
