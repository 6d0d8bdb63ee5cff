"""Expert parallelism inside ``shard_map``: ``jax_bridge.fused_moe(..., ep_axis="name")``.

Per device of the mesh axis ``ep_axis`` (size W): ``x [..., D]`` holds its tokens (sharded over
tokens), ``w_up [E/W, 2F, D]`` and ``w_down [E/W, D, F]`` its E/W contiguous experts (device r:
experts ``r*E/W .. (r+1)*E/W - 1``), ``router_weight [E, D]`` and ``expert_bias [E]`` are
replicated. One call:

1. route the device's tokens (XLA ops: ``jax_bridge.reference.route_reference``, differentiable);
2. place each assignment's row of x, routing weight and local expert id in a fixed-size send
   buffer, one block per destination device;
3. ``jax.lax.all_to_all`` the buffers (XLA:CPU has no ``ragged_all_to_all``, so the blocks are
   fixed-size and unused slots carry weight 0);
4. run the local experts on the received rows (``jax_bridge.moe_experts``, the fused kernels);
5. ``all_to_all`` the weighted rows back and sum each token's ``top_k`` rows.

Buffer sizes, static: dropless, each destination block holds ``N * min(K, E/W)`` rows (the most
one device can send another), so the experts see ``W * N * min(K, E/W)`` rows of which
``N * K`` are real (the padding costs expert FLOPs: a ragged all-to-all would remove it).
``capacity_factor``: each device sends each expert at most ``S = min(C, N)`` rows, its best
weighted, ``C = capacity(W*N, E)`` the capacity of the whole axis' batch, and the owner keeps
the C best of the ``W*S`` candidates (weight, then token order over the gathered batch): the
single-device layer's selection on the gathered batch. The experts run on the kept rows only
(``E/W * min(C, W*S)`` rows); the send buffers still hold ``E*S`` rows, the price of exactness
with static shapes.

Gradients come from JAX's own transposes (``all_to_all`` transposes to ``all_to_all``) and the
experts' ``custom_vjp``: ``jax.grad`` of the ``shard_map``ped function gives the single-device
layer's gradients on the gathered batch; the replicated router's gradient is summed over the
axis by JAX (its varying-axes cast). ``aux``: ``tokens_per_expert`` and ``dropped_tokens`` are
the axis' totals and the two losses are the gathered batch's (``psum`` of the devices' shares),
the same value on every device: add them once to a ``psum``ed loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flashfusemoe.config import MoEOptions
from flashfusemoe.parallel import validate_ep_shapes
from jax_bridge.callback import _standin
from jax_bridge.experts import moe_experts
from jax_bridge.reference import route_reference

__all__ = ["ep_fused_moe"]


def ep_fused_moe(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None, axis: str,
                 return_aux=False):
    """``jax_bridge.fused_moe(..., ep_axis=axis)``, called inside ``shard_map``."""
    if not isinstance(axis, str):
        raise TypeError(f"ep_axis must be a mesh axis name (str), got {type(axis).__name__} {axis!r}")
    try:
        W = jax.lax.axis_size(axis)
    except NameError as e:
        raise ValueError(f"ep_axis={axis!r} is not a mesh axis of the enclosing shard_map: {e}") from None
    named = {"x": x, "router_weight": router_weight, "w_up": w_up, "w_down": w_down}
    standins = {name: _standin(name, a) for name, a in named.items()}
    bias_standin = None if expert_bias is None else _standin("expert_bias", expert_bias)
    try:
        D, E, F = validate_ep_shapes(*standins.values(), bias_standin, options, W, group_name="ep_axis")
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace(", device meta", "").replace("rank's", "device's")) from None
    if options.gemm == "auto":
        options = dataclasses.replace(options, gemm="grouped")
    x = jnp.asarray(x)
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, D)
    N, K, El = x2.shape[0], options.top_k, E // W
    routing = route_reference(
        x2, router_weight, K, score_func=options.score_func, norm_topk_prob=options.norm_topk_prob,
        expert_bias=expert_bias, n_group=options.n_group, topk_group=options.topk_group,
        routed_scaling_factor=options.routed_scaling_factor)
    ids = routing.topk_ids.reshape(-1)
    w_flat = routing.topk_weights.reshape(-1)
    token = jnp.arange(N * K) // K
    recv_to_comp = None
    if options.capacity_factor is None:
        slot, x_recv, w_recv, id_recv = _dispatch_dropless(x2, ids, w_flat, token, W, El, N, K, axis)
        kept = jnp.ones_like(ids, dtype=jnp.bool_)
        dropped_of = None
    else:
        C = options.capacity(W * N, E)
        slot, kept, x_recv, w_recv, id_recv, recv_to_comp = _dispatch_capacity(
            x2, ids, w_flat, token, W, El, N, C, axis)
        dropped_of = C
    y_recv = moe_experts(x_recv, id_recv[:, None], w_recv[:, None], w_up, w_down,
                         activation=options.activation, gemm=options.gemm, recompute=options.recompute,
                         check_ids=False, distinct_ids=True)
    if recv_to_comp is not None:  # the compact rows back to their received places
        y_recv = jnp.where((recv_to_comp >= 0)[:, None], y_recv[jnp.maximum(recv_to_comp, 0)], 0)
    y_back = jax.lax.all_to_all(y_recv, axis, 0, 0, tiled=True)
    acc = jnp.float64 if x2.dtype == jnp.float64 else jnp.float32
    rows = jnp.where(kept[:, None], y_back[jnp.where(kept, slot, 0)].astype(acc), 0)
    out = rows.reshape(N, K, D).sum(1).astype(x2.dtype).reshape(*lead_shape, D)
    if not return_aux:
        return out
    return out, _aux(routing.logits, ids, E, W * N, dropped_of, options.score_func, axis)


def _dispatch_dropless(x2, ids, w_flat, token, W, El, N, K, axis):
    """Send blocks of ``B = N * min(K, El)`` rows per destination. Returns each assignment's slot
    in the send buffer and the received rows, weights and local expert ids."""
    B = N * min(K, El)
    dest = ids // El
    onehot = jax.nn.one_hot(dest, W, dtype=jnp.int32)
    pos = (jnp.cumsum(onehot, axis=0) * onehot).sum(1) - 1  # rank among this destination's rows
    slot = dest * B + pos
    D = x2.shape[1]
    x_send = jnp.zeros((W * B, D), x2.dtype).at[slot].set(x2[token], unique_indices=True)
    w_send = jnp.zeros((W * B,), w_flat.dtype).at[slot].set(w_flat, unique_indices=True)
    id_send = jnp.zeros((W * B,), jnp.int32).at[slot].set((ids % El).astype(jnp.int32), unique_indices=True)
    sends = (x_send, w_send, id_send)
    x_recv, w_recv, id_recv = (jax.lax.all_to_all(a, axis, 0, 0, tiled=True) for a in sends)
    return slot, x_recv, w_recv, id_recv


def _dispatch_capacity(x2, ids, w_flat, token, W, El, N, C, axis):
    """Send ``S = min(C, N)`` slots per expert (this device's best-weighted assignments, in token
    order); the owner keeps the C best candidates and compacts them to ``C' = min(C, W*S)`` rows
    per local expert. Returns each assignment's slot, whether it was sent, the compact rows,
    weights (0 in unused rows) and local expert ids, and the compact row of each received row
    (-1: not kept)."""
    E, D = W * El, x2.shape[1]
    S = min(C, N)
    w_sel = jax.lax.stop_gradient(w_flat)
    dense_sel = jnp.zeros((N, E), jnp.bool_).at[token, ids].set(True)
    dense_w = jnp.zeros((N, E), w_sel.dtype).at[token, ids].set(w_sel)
    key = jnp.where(dense_sel, -dense_w, jnp.inf)
    rank = jnp.argsort(jnp.argsort(key, axis=0, stable=True), axis=0, stable=True)  # ties: lower token
    keep_dense = dense_sel & (rank < S)
    slot_dense = jnp.cumsum(keep_dense, axis=0) - 1  # token order among the sent ones
    sent = keep_dense[token, ids]
    slot = jnp.where(sent, ids * S + slot_dense[token, ids], E * S)  # E*S: out of range, dropped
    x_send = jnp.zeros((E * S, D), x2.dtype).at[slot].set(x2[token], mode="drop")
    # Empty slots carry weight -1 (routing weights are >= 0): not a candidate.
    w_send = jnp.full((E * S,), -1, w_flat.dtype).at[slot].set(w_flat, mode="drop")
    x_recv, w_recv = (jax.lax.all_to_all(a, axis, 0, 0, tiled=True) for a in (x_send, w_send))
    # Candidates of local expert j: W sources x S slots, in (source, slot) = gathered token order.
    cand = jax.lax.stop_gradient(w_recv).reshape(W, El, S).transpose(1, 0, 2).reshape(El, W * S)
    score = jnp.where(cand >= 0, -cand, jnp.inf)
    position = jnp.argsort(jnp.argsort(score, axis=1, stable=True), axis=1, stable=True)
    kept = (position < C) & (cand >= 0)  # [El, W*S]
    Cc = min(C, W * S)
    comp_row = jnp.arange(El)[:, None] * Cc + position
    recv_to_comp = jnp.where(kept, comp_row, -1).reshape(El, W, S).transpose(1, 0, 2).reshape(-1)
    comp_index = jnp.where(recv_to_comp >= 0, recv_to_comp, El * Cc)  # El*Cc: out of range, dropped
    x_comp = jnp.zeros((El * Cc, D), x_recv.dtype).at[comp_index].set(x_recv, mode="drop")
    w_comp = jnp.zeros((El * Cc,), w_recv.dtype).at[comp_index].set(w_recv, mode="drop")
    id_comp = jnp.repeat(jnp.arange(El, dtype=jnp.int32), Cc)
    return slot, sent, x_comp, w_comp, id_comp, recv_to_comp.astype(jnp.int32)


def _aux(logits, ids, E: int, total: int, capacity, score_func: str, axis: str) -> dict:
    """The gathered batch's aux losses (``psum`` of this device's shares) and counts."""
    tokens_per_expert = jax.lax.psum(jnp.zeros((E,), jnp.int32).at[ids].add(1), axis)
    if capacity is None:
        dropped = jnp.zeros((), jnp.int32)
    else:
        dropped = jnp.maximum(tokens_per_expert - capacity, 0).sum().astype(jnp.int32)
    if score_func == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / scores.sum(axis=-1, keepdims=True)
    denom = max(total, 1)
    fraction = tokens_per_expert.astype(logits.dtype) / denom
    load_balance = E * jnp.sum(fraction * probs.sum(axis=0)) / denom
    z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))) / denom
    return {"load_balance_loss": jax.lax.psum(load_balance, axis), "z_loss": jax.lax.psum(z_loss, axis),
            "tokens_per_expert": tokens_per_expert, "dropped_tokens": dropped}
