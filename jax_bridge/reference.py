"""Pure-JAX MoE references: a dense ground truth and a ``ragged_dot`` baseline.

Both follow the routing semantics of ``docs/design.md``. Neither imports torch.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Routing", "moe_reference", "ragged_dot_moe", "route_reference"]

_HI = jax.lax.Precision.HIGHEST
_ACTIVATIONS = ("swiglu", "geglu", "relu2")
_SCORE_FUNCS = ("softmax", "sigmoid")


class Routing(NamedTuple):
    """Routing decisions for ``N`` flattened tokens and ``K = top_k``."""

    logits: jax.Array  # [N, E], routing dtype
    topk_ids: jax.Array  # [N, K] int32, selection order
    topk_weights: jax.Array  # [N, K], routing dtype, normalised and scaled (dropped included)
    kept: jax.Array  # [N, K] bool, False where capacity dropped the assignment


def _routing_dtype(x: jax.Array):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _act(h: jax.Array, activation: str) -> jax.Array:
    if activation == "swiglu":
        return jax.nn.silu(h)
    if activation == "geglu":
        return jax.nn.gelu(h, approximate=False)
    return jnp.square(jax.nn.relu(h))


def _glu(h: jax.Array, activation: str) -> jax.Array:
    """``[..., 2F] -> [..., F]``: ``act(h[..., :F]) * h[..., F:]``."""
    f = h.shape[-1] // 2
    return _act(h[..., :f], activation) * h[..., f:]


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got {jnp.asarray(a).dtype}")


def _check_ndim(name: str, a, ndim: int) -> None:
    if jnp.ndim(a) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {jnp.shape(a)}")


def _check_common(x, router_weight, top_k, activation=None):
    if jnp.ndim(x) < 1:
        raise ValueError("x must have at least one dimension [..., D]")
    _check_float("x", x)
    _check_float("router_weight", router_weight)
    _check_ndim("router_weight", router_weight, 2)
    e, d = jnp.shape(router_weight)
    if jnp.shape(x)[-1] != d:
        raise ValueError(f"x has D={jnp.shape(x)[-1]} but router_weight is {jnp.shape(router_weight)}")
    if isinstance(top_k, bool):
        raise TypeError("top_k must be an int")
    try:
        top_k = operator.index(top_k)
    except TypeError:
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}") from None
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, E={e}], got {top_k}")
    if activation is not None and activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return e, d, top_k


def _check_experts(w_up, w_down, e, d):
    _check_float("w_up", w_up)
    _check_float("w_down", w_down)
    _check_ndim("w_up", w_up, 3)
    _check_ndim("w_down", w_down, 3)
    eu, f2, du = jnp.shape(w_up)
    if eu != e or du != d or f2 % 2:
        raise ValueError(f"w_up must be [E={e}, 2F, D={d}], got {jnp.shape(w_up)}")
    if jnp.shape(w_down) != (e, d, f2 // 2):
        raise ValueError(f"w_down must be [E={e}, D={d}, F={f2 // 2}], got {jnp.shape(w_down)}")


def route_reference(
    x: jax.Array,
    router_weight: jax.Array,
    top_k: int,
    *,
    score_func: str = "softmax",
    norm_topk_prob: bool = True,
    expert_bias: jax.Array | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    capacity_factor: float | None = None,
) -> Routing:
    """Routing of ``x [..., D]`` (flattened to ``N`` tokens) by ``router_weight [E, D]``.

    Math runs in fp32 (fp64 for fp64 ``x``). Top-k and capacity ties go to the lower expert
    index and the lower token index. ``topk_weights`` is differentiable through the scores.
    """
    e, d, top_k = _check_common(x, router_weight, top_k)
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {_SCORE_FUNCS}, got {score_func!r}")
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group must be given together")
    if n_group is not None:
        if not (0 < n_group <= e and e % n_group == 0):
            raise ValueError(f"n_group must divide E={e}, got {n_group}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        if topk_group * (e // n_group) < top_k:
            raise ValueError("topk_group groups hold fewer than top_k experts")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")

    x = jnp.asarray(x)
    cd = _routing_dtype(x)
    x2 = x.reshape(-1, d).astype(cd)
    n = x2.shape[0]
    logits = jnp.matmul(x2, jnp.asarray(router_weight).astype(cd).T, precision=_HI)
    scores = jax.nn.softmax(logits, axis=-1) if score_func == "softmax" else jax.nn.sigmoid(logits)

    sel = jax.lax.stop_gradient(scores)
    if expert_bias is not None:
        _check_ndim("expert_bias", expert_bias, 1)
        if jnp.shape(expert_bias)[0] != e:
            raise ValueError(f"expert_bias must be [E={e}], got {jnp.shape(expert_bias)}")
        sel = sel + jax.lax.stop_gradient(jnp.asarray(expert_bias).astype(cd))
    if n_group is not None:
        gs = e // n_group
        grouped = sel.reshape(n, n_group, gs)
        group_score = jax.lax.top_k(grouped, min(2, gs))[0].sum(-1)  # [N, G]
        top_groups = jax.lax.top_k(group_score, topk_group)[1]  # [N, topk_group]
        group_ok = jax.nn.one_hot(top_groups, n_group, dtype=jnp.bool_).any(axis=1)  # [N, G]
        allowed = jnp.repeat(group_ok, gs, axis=1)  # [N, E]
        sel = jnp.where(allowed, sel, -jnp.inf)
    # lax.top_k puts the lower index first among equal values.
    topk_ids = jax.lax.top_k(sel, top_k)[1].astype(jnp.int32)

    w = jnp.take_along_axis(scores, topk_ids, axis=-1)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    w = w * routed_scaling_factor

    if capacity_factor is None:
        kept = jnp.ones((n, top_k), jnp.bool_)
    else:
        cap = math.ceil(capacity_factor * n * top_k / e)
        onehot = jax.nn.one_hot(topk_ids, e, dtype=jnp.bool_)  # [N, K, E]
        selected = onehot.any(axis=1)  # [N, E]
        dense_w = jnp.einsum("nk,nke->ne", jax.lax.stop_gradient(w), onehot.astype(cd), precision=_HI)
        key = jnp.where(selected, -dense_w, jnp.inf)
        # Stable sort along tokens: equal weights keep token order; inverse permutation = rank.
        order = jnp.argsort(key, axis=0, stable=True)
        rank = jnp.argsort(order, axis=0, stable=True)
        keep_dense = selected & (rank < cap)
        kept = jnp.take_along_axis(keep_dense, topk_ids, axis=-1)
    return Routing(logits, topk_ids, w, kept)


def moe_reference(
    x: jax.Array,
    router_weight: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    top_k: int,
    *,
    activation: str = "swiglu",
    shared_w_up: jax.Array | None = None,
    shared_w_down: jax.Array | None = None,
    shared_gate_weight: jax.Array | None = None,
    return_aux: bool = False,
    **routing_options: Any,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Dense MoE ground truth: ``x [..., D] -> out [..., D]`` (dtype of ``x``).

    ``routing_options``: ``route_reference``'s keyword arguments (``score_func``, ``expert_bias``,
    groups, scaling, ``capacity_factor``).

    ``router_weight [E, D]``, ``w_up [E, 2F, D]`` (rows ``0:F`` gate, ``F:2F`` up),
    ``w_down [E, D, F]``; optional shared expert ``shared_w_up [2Fs, D]``,
    ``shared_w_down [D, Fs]``, gated per token by ``sigmoid(x @ shared_gate_weight.T)``
    (``[1, D]``). All math runs in fp32 (fp64 for fp64 ``x``); every expert runs on every
    token (``[N, E, 2F]`` memory) and a dense ``[N, E]`` combine matrix picks the outputs.

    With ``return_aux`` returns ``(out, aux)``, ``aux`` holding ``load_balance_loss``,
    ``z_loss`` (differentiable through the router), ``tokens_per_expert`` (int32 ``[E]``,
    before capacity) and ``dropped_tokens`` (int32 scalar).
    """
    e, d, top_k = _check_common(x, router_weight, top_k, activation)
    _check_experts(w_up, w_down, e, d)
    if (shared_w_up is None) != (shared_w_down is None):
        raise ValueError("shared_w_up and shared_w_down must be given together")
    if shared_gate_weight is not None and shared_w_up is None:
        raise ValueError("shared_gate_weight needs shared_w_up and shared_w_down")
    if shared_w_up is not None:
        _check_ndim("shared_w_up", shared_w_up, 2)
        _check_ndim("shared_w_down", shared_w_down, 2)
        fs2, ds = jnp.shape(shared_w_up)
        if ds != d or fs2 % 2:
            raise ValueError(f"shared_w_up must be [2Fs, D={d}], got {jnp.shape(shared_w_up)}")
        if jnp.shape(shared_w_down) != (d, fs2 // 2):
            raise ValueError(f"shared_w_down must be [D={d}, Fs={fs2 // 2}], got {jnp.shape(shared_w_down)}")
        if shared_gate_weight is not None and jnp.shape(shared_gate_weight) != (1, d):
            raise ValueError(f"shared_gate_weight must be [1, D={d}], got {jnp.shape(shared_gate_weight)}")

    x = jnp.asarray(x)
    routing = route_reference(x, router_weight, top_k, **routing_options)
    cd = routing.logits.dtype
    x2 = x.reshape(-1, d).astype(cd)

    onehot = jax.nn.one_hot(routing.topk_ids, e, dtype=cd)  # [N, K, E]
    w_kept = jnp.where(routing.kept, routing.topk_weights, 0)
    combine = jnp.einsum("nk,nke->ne", w_kept, onehot, precision=_HI)  # [N, E]
    h = jnp.einsum("nd,efd->nef", x2, jnp.asarray(w_up).astype(cd), precision=_HI)
    y = jnp.einsum("nef,edf->ned", _glu(h, activation), jnp.asarray(w_down).astype(cd), precision=_HI)
    out = jnp.einsum("ne,ned->nd", combine, y, precision=_HI)

    if shared_w_up is not None:
        hs = jnp.matmul(x2, jnp.asarray(shared_w_up).astype(cd).T, precision=_HI)
        ys = jnp.matmul(_glu(hs, activation), jnp.asarray(shared_w_down).astype(cd).T, precision=_HI)
        if shared_gate_weight is not None:
            g = jnp.matmul(x2, jnp.asarray(shared_gate_weight).astype(cd).T, precision=_HI)  # [N, 1]
            ys = ys * jax.nn.sigmoid(g)
        out = out + ys
    out = out.astype(x.dtype).reshape(x.shape)
    if not return_aux:
        return out

    logits = routing.logits
    tokens_per_expert = onehot.sum(axis=(0, 1)).astype(jnp.int32)
    dropped = (~routing.kept).sum().astype(jnp.int32)
    if routing_options.get("score_func", "softmax") == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        s = jax.nn.sigmoid(logits)
        probs = s / s.sum(-1, keepdims=True)
    n = logits.shape[0]
    frac = jax.lax.stop_gradient(tokens_per_expert.astype(cd) / n)
    aux = {
        "load_balance_loss": e * jnp.sum(frac * probs.mean(axis=0)),
        "z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        "tokens_per_expert": tokens_per_expert,
        "dropped_tokens": dropped,
    }
    return out, aux


def ragged_dot_moe(x: jax.Array, router_weight: jax.Array, w_up: jax.Array, w_down: jax.Array, top_k: int, *,
                   activation: str = "swiglu", return_aux: bool = False
                   ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Dropless sorted MoE with ``jax.lax.ragged_dot``: the pure-JAX speed baseline.

    ``x [..., D] -> [..., D]``; softmax top-k routing with normalised weights, in fp32.
    Assignments are sorted by expert (token order within an expert), gathered, run through
    two grouped GEMMs (fp32 accumulation, activation in fp32, operands in ``x.dtype``) and
    combined per token in fp32. fp32/fp64 inputs get full-precision GEMMs (no TF32).

    With ``return_aux`` returns ``(out, aux)``, ``aux`` as ``moe_reference``'s (dropless:
    ``dropped_tokens`` is 0).
    """
    if not isinstance(return_aux, bool):
        raise TypeError(f"return_aux must be a bool, got {type(return_aux).__name__} {return_aux!r}")
    e, d, top_k = _check_common(x, router_weight, top_k, activation)
    _check_experts(w_up, w_down, e, d)
    x = jnp.asarray(x)
    dt = x.dtype
    cd = _routing_dtype(x)
    prec = _HI if dt in (jnp.float32, jnp.float64) else None
    x2 = x.reshape(-1, d)
    n = x2.shape[0]

    logits = jnp.matmul(
        x2, jnp.asarray(router_weight).astype(dt).T, precision=prec, preferred_element_type=cd
    )
    scores = jax.nn.softmax(logits.astype(cd), axis=-1)
    topk_w, topk_ids = jax.lax.top_k(scores, top_k)
    topk_w = topk_w / topk_w.sum(-1, keepdims=True)

    flat_ids = topk_ids.reshape(-1)  # assignment a = n*K + k
    order = jnp.argsort(flat_ids, stable=True)  # row -> assignment
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)

    xs = x2[order // top_k]  # [A, D]
    w_up_t = jnp.swapaxes(jnp.asarray(w_up).astype(dt), 1, 2)  # [E, D, 2F]
    w_down_t = jnp.swapaxes(jnp.asarray(w_down).astype(dt), 1, 2)  # [E, F, D]
    h = jax.lax.ragged_dot(xs, w_up_t, group_sizes, precision=prec, preferred_element_type=cd)
    a = _glu(h, activation).astype(dt)
    y = jax.lax.ragged_dot(a, w_down_t, group_sizes, precision=prec, preferred_element_type=cd)  # [A, D]
    y = y[inv].reshape(n, top_k, d)
    out = jnp.einsum("nk,nkd->nd", topk_w, y, precision=_HI)
    out = out.astype(dt).reshape(x.shape)
    if not return_aux:
        return out
    logits = logits.astype(cd)
    frac = group_sizes.astype(cd) / max(n, 1)
    mean_probs = jax.nn.softmax(logits, axis=-1).sum(axis=0) / max(n, 1)
    aux = {  # N = 0: both losses are 0 (as the bridge's), not the NaN of an empty mean
        "load_balance_loss": e * jnp.sum(frac * mean_probs),
        "z_loss": jnp.square(jax.nn.logsumexp(logits, axis=-1)).sum() / max(n, 1),
        "tokens_per_expert": group_sizes,
        "dropped_tokens": jnp.zeros((), jnp.int32),
    }
    return out, aux
