"""Expert parallelism on ``torch.distributed``: experts sharded over a process group, tokens moved
by all-to-all.

``fused_moe(..., ep_group=group)`` and ``MoELayer(..., ep_group=group)`` land here. For a group of
size W, rank r holds the experts ``r*E/W .. (r+1)*E/W - 1`` (``w_up [E/W, 2F, D]``,
``w_down [E/W, D, F]``); ``router_weight [E, D]`` and ``expert_bias [E]`` are replicated; ``x`` is
this rank's tokens and ``out`` their output. One call, on every rank of the group:

1. route this rank's tokens with the fused routing kernel (all E experts);
2. sort the assignments by expert (the owners' ranges are contiguous, so each destination rank
   gets one contiguous block of rows) and exchange the per-expert counts (``all_gather``);
3. ``all_to_all_single`` the rows and their routing weights to the experts' owners;
4. run the local experts on the received rows (one function, ``_local_experts``);
5. ``all_to_all_single`` the weighted results back and sum each token's ``top_k`` rows.

Dropless (the default): the split sizes come from the exchanged counts, which the host reads once
per call (``.tolist()``: the one host sync; the receive buffer's size depends on it). With
``capacity_factor`` every buffer has a fixed size and nothing is read on the host: each rank
sends each expert at most ``S = min(C, N)`` rows (``C = capacity(W*N, E)``, the capacity of the
whole group's batch; its own best-weighted ones), and the owner keeps the ``C`` best of the
``W*S`` candidates (weight, then token order over the concatenated batch), the same selection as
the single-process layer on the concatenated batch. The experts then run on the kept rows only
(compacted to ``E/W * min(C, W*S)`` rows), but the exchanged buffers hold ``E*S`` rows per rank:
about ``W * capacity_factor`` times the dropless volume when ``C <= N``, the price of this exact,
static-shape selection (a per-rank capacity, as GShard's, would send ``capacity_factor * N*K``).
Capacity mode needs every rank to pass the same number of tokens N (the buffer sizes derive
from it).

Gradients flow back the same way, by all-to-all in reverse: ``x`` gets its own tokens' gradient,
``w_up``/``w_down`` the complete gradient of the local experts (every rank's tokens that reached
them), ``router_weight`` this rank's share (the sum over ranks is the full gradient, what DDP's
all-reduce computes).

Aux values describe the whole group's batch: ``tokens_per_expert [E]`` and ``dropped_tokens`` are
group totals (from the count exchange). ``load_balance_loss`` and ``z_loss`` are this rank's
*share* of the group's losses: ``E * sum_e f_e * sum_{n in rank} p_ne / N_total`` and
``sum_{n in rank} lse_n^2 / N_total`` with ``f_e`` the group's fraction of assignments to expert
e. The shares sum over ranks to the losses of the concatenated batch, and each share's gradient
reaches only this rank's logits, so the per-rank router gradients sum to the full gradient, as
for the main loss. (DDP averages the replicated parameters' gradients over ranks, i.e. the full
gradient / W: scale the expert gradients by 1/W to keep one objective; the README shows how.)

Every rank of the group must call the layer and backpropagate through ``out`` the same number of
times, in the same order as the other collectives on the group (as for any collective): the
backward's all-to-alls pair up across ranks. In 16-bit, each expert's weighted output row is
rounded to x's dtype before the K rows of a token are summed (in fp32); the single-process
layer rounds once, after the sum.

The checks that need the other ranks (the same E, expert count, widths and top_k everywhere; the
same N in capacity mode) run once per configuration, with one extra ``all_gather`` and host sync.

``torch.compile`` traces the whole call (``fullgraph=True`` works): routing, dispatch and combine
are custom ops with their collectives inside, and the experts are ``moe_experts``' custom op. With
``capacity_factor`` every shape is fixed; dropless, the received row count is a data-dependent
size of the dispatch op (the split sizes leave it as a host tensor, so the ops downstream read
them without another sync). Eagerly, ``autograd.Function``s run the same helpers without the
custom-op dispatch. The cross-rank agreement check is eager-only.
"""

import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from flashfusemoe.config import (
    MoEOptions,
    _check_expert_bias,
    _check_float_tensors,
    _check_same_device_and_dtype,
    _check_x_rank,
    _describe,
    _router_dims,
    autocast_dtype,
    check_has_data,
)
from flashfusemoe.kernels import compute_dtype, permute, routing

_CHECKED: set = set()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def group_size_and_rank(group) -> tuple[int, int]:
    """``(W, rank)`` of a ``torch.distributed`` process group; TypeError for anything else."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"ep_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return dist.get_world_size(group), dist.get_rank(group)


def local_experts(num_experts: int, group) -> tuple[int, int]:
    """``(first, count)``: the experts rank ``rank(group)`` owns out of ``num_experts``."""
    W, rank = group_size_and_rank(group)
    if num_experts % W:
        raise ValueError(f"num_experts={num_experts} must be divisible by the ep_group size W={W}")
    per_rank = num_experts // W
    return rank * per_rank, per_rank


def validate_ep_inputs(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions, group,
                       *, autocast=False):
    """The checks of ``validate_inputs`` with local expert weights. Returns ``(D, E, F, W, rank)``."""
    W, rank = group_size_and_rank(group)
    D, E, F = validate_ep_shapes(x, router_weight, w_up, w_down, expert_bias, options, W, autocast=autocast)
    return D, E, F, W, rank


def validate_ep_shapes(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions, W: int, *,
                       autocast=False, group_name="ep_group"):
    """``validate_inputs`` for ``w_up``/``w_down`` holding E/W local experts (also the JAX bridge's,
    on shape-only stand-ins). Returns ``(D, E, F)``."""
    named = {"x": x, "router_weight": router_weight, "w_up": w_up, "w_down": w_down}
    _check_float_tensors(named)
    _check_x_rank("x", x)
    D, E = _router_dims(x, router_weight)
    if E % W:
        raise ValueError(
            f"router_weight has E={E} experts, which the {group_name} of size W={W} cannot split evenly: "
            "E must be divisible by W"
        )
    E_local = E // W
    for name in ("w_up", "w_down"):
        if named[name].dim() != 3:
            raise ValueError(f"{name} must have rank 3, got {_describe(named[name])}")
    if w_up.shape[0] != E_local or w_up.shape[2] != D:
        raise ValueError(
            f"w_up must hold this rank's E/W={E}/{W}={E_local} experts as [{E_local}, 2F, D={D}] "
            f"(router_weight has E={E}, {group_name} size W={W}), got {_describe(w_up)}"
        )
    if w_up.shape[1] % 2:
        raise ValueError(f"w_up must have an even number of rows (gate and up halves), got {w_up.shape[1]}")
    F = w_up.shape[1] // 2
    if tuple(w_down.shape) != (E_local, D, F):
        raise ValueError(
            f"w_down must hold this rank's experts as [E/W={E_local}, D={D}, F={F}], got {_describe(w_down)}"
        )
    if D < 1 or F < 1:
        raise ValueError(f"D={D} and F={F} must both be >= 1")
    _check_same_device_and_dtype(named, autocast)
    _check_expert_bias(expert_bias, E, "x", x.device)
    options.check_num_experts(E)
    if options.max_tokens_per_expert is not None:
        raise ValueError(
            f"max_tokens_per_expert={options.max_tokens_per_expert} is not supported with {group_name}: the "
            "local experts size their layout from the tokens they receive (capacity_factor gives "
            "fixed-size buffers)"
        )
    return D, E, F


def _check_group_agrees(N: int, D: int, E: int, F: int, W: int, options: MoEOptions, x, group) -> None:
    """Every rank passes the same E, local expert count, D, F, options (and N with capacity).

    One ``all_gather`` and host sync per configuration and process (cached); skipped under tracing.
    """
    if torch.compiler.is_compiling():
        return
    capacity = options.capacity_factor is not None
    key = (id(group), N if capacity else -1, D, E, F, options, x.dtype)
    if key in _CHECKED:
        return
    sig = [E, E // W, D, F, options.top_k, N if capacity else -1, zlib.crc32(repr(options).encode()),
           zlib.crc32(str(x.dtype).encode())]
    mine = torch.tensor(sig, dtype=torch.int64, device=x.device)
    gathered = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(gathered, mine, group=group)
    rows = [g.tolist() for g in gathered]
    names = ("E", "E/W", "D", "F", "top_k", "N (capacity mode)", "options", "dtype")
    for r, row in enumerate(rows):
        for name, a, b in zip(names, sig, row):
            if a != b:
                raise ValueError(
                    f"ep_group rank {r} disagrees with this rank on {name}: it has {b}, this rank {a}. "
                    "Every rank of the group must pass the same router, expert shapes and options"
                    + (", and with capacity_factor the same number of tokens N" if name[0] == "N" else "")
                )
    _CHECKED.add(key)


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


def _all_to_all(t: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    """``all_to_all_single`` of rows: ``t [sum(in_splits), ...]`` -> ``[sum(out_splits), ...]``.

    ``None`` splits: equal blocks (then ``t.shape[0]`` is a multiple of W)."""
    t = t.contiguous()
    rows = t.shape[0] if out_splits is None else sum(out_splits)
    out = t.new_empty((rows, *t.shape[1:]))
    dist.all_to_all_single(out, t, out_splits, in_splits, group=group)
    return out


class _State:
    """What dispatch learns and combine and the backward need (one call, one rank)."""

    num_experts: int  # E, set by the caller
    top_k: int
    assign_to_row: torch.Tensor  # [N*K] int32: row of each assignment in the send layout, -1 none
    row_to_assign: torch.Tensor  # [R] int32
    send_splits: list | None  # rows to each rank (None: equal blocks)
    recv_splits: list | None
    comp_to_recv: torch.Tensor | None  # capacity mode: [El*C'] received row of each compact row, -1 none
    recv_to_comp: torch.Tensor | None  # [M] compact row of each received row, -1: not kept
    tokens_per_expert: torch.Tensor  # [E] int32, the group's
    num_tokens: torch.Tensor  # [] int64, the group's
    dropped: torch.Tensor  # [] int32, the group's
    recv_rows: int  # M
    x_recv_meta: torch.Tensor  # [0, D] like x_recv, w_recv_meta [0] like w_recv: zero gradients' template
    w_recv_meta: torch.Tensor


class _Route(torch.autograd.Function):
    """The fused routing kernel: ``x [N, D] -> logits [N, E], topk_weights [N, K], topk_ids [N, K]``."""

    @staticmethod
    def forward(ctx, x, router_weight, expert_bias, options: MoEOptions, block_counts_out: list):
        logits, ids, weights, block_counts, block_n = routing.route_forward(
            x, router_weight, expert_bias, options.top_k, options.score_func, options.norm_topk_prob,
            options.n_group, options.topk_group, float(options.routed_scaling_factor), with_block_counts=True,
        )
        block_counts_out.extend((block_counts, block_n))
        ctx.options = options
        ctx.save_for_backward(x, router_weight, logits, ids)
        ctx.mark_non_differentiable(ids)
        ctx.set_materialize_grads(False)
        return logits, weights, ids

    @staticmethod
    def backward(ctx, grad_logits, grad_weights, _):
        x, router_weight, logits, ids = ctx.saved_tensors
        o = ctx.options
        if grad_weights is None and grad_logits is None:
            return None, None, None, None, None
        grad_x, grad_router = _route_grads(x, router_weight, logits, ids, grad_logits, grad_weights,
                                           o.score_func, o.norm_topk_prob, float(o.routed_scaling_factor))
        return grad_x, grad_router, None, None, None


def _route_grads(x, router_weight, logits, ids, grad_logits, grad_weights, score_func, norm_topk_prob, scale):
    """Gradients of x [N, D] and router_weight [E, D] from those of logits and topk_weights (None: 0)."""
    N, K = ids.shape
    if grad_weights is None:
        grad_weights = logits.new_zeros(N, K)
    identity = torch.arange(N * K, dtype=torch.int32, device=x.device)
    gl = routing.route_backward(logits, ids, grad_weights.reshape(-1).to(logits.dtype).contiguous(), identity,
                                grad_logits, score_func, norm_topk_prob, scale, out_dtype=x.dtype)
    return torch.mm(gl, router_weight), torch.mm(gl.t(), x)


def _dropless_dispatch(x, topk_weights, topk_ids, block_counts, block_n: int, E: int, group):
    """Dropless mode's exchange: the counts first (``all_gather``, read on the host: the one sync),
    then the rows and weights with those split sizes. Returns ``x_recv [M, D]``, ``w_recv [M]``,
    ``ids_recv [M]`` int32 (rows ordered by source rank, then local expert), the send layout's
    ``assign_to_row`` and ``row_to_assign [N*K]`` int32, ``gathered [W, E+1]`` int64 (every rank's
    per-expert counts and N) and the send and receive split sizes (lists of W ints)."""
    W, rank = group_size_and_rank(group)
    N = topk_ids.shape[0]
    El, i64 = E // W, torch.int64
    x_rows, assign_to_row, row_to_assign, _, tpe, _ = permute.layout_and_gather(x, topk_ids, E, block_counts,
                                                                                 block_n)
    counts = torch.cat([tpe.to(i64), torch.full((1,), N, dtype=i64, device=x.device)])
    gathered = torch.empty(W, E + 1, dtype=i64, device=x.device)
    dist.all_gather(list(gathered.unbind(0)), counts, group=group)
    table = gathered.tolist()  # the one host sync of dropless mode: split sizes
    send_splits = [sum(table[rank][r * El:(r + 1) * El]) for r in range(W)]
    recv_splits = [sum(table[s][rank * El:(rank + 1) * El]) for s in range(W)]
    block = gathered[:, rank * El:(rank + 1) * El].reshape(-1)
    ids_recv = torch.repeat_interleave(torch.arange(El, dtype=torch.int32, device=x.device).repeat(W), block,
                                       output_size=sum(recv_splits))
    w_rows = topk_weights.reshape(-1)[row_to_assign.long()]
    x_recv = _all_to_all(x_rows, recv_splits, send_splits, group)
    w_recv = _all_to_all(w_rows, recv_splits, send_splits, group)
    return x_recv, w_recv, ids_recv, assign_to_row, row_to_assign, gathered, send_splits, recv_splits


def _capacity_dispatch(x, topk_weights, topk_ids, E: int, C: int, group):
    """Capacity mode's fixed-size exchange (see the module docstring).

    Each rank sends ``S = min(C, N)`` slots per expert (``M = E*S`` rows in all, received as
    ``[W, E/W, S]``); the owner keeps the C best candidates of each local expert and compacts them
    to ``C' = min(C, W*S)`` rows per expert, so the experts run ``E/W * C'`` rows. Returns
    ``x_comp [E/W*C', D]``, ``w_comp [E/W*C']`` (0 in unused rows), ``ids_comp [E/W*C']`` int32,
    ``comp_to_recv [E/W*C']`` and ``recv_to_comp [M]`` (the two directions between compact and
    received rows, -1 none), the send layout's ``assign_to_row [N*K]`` and ``row_to_assign [M]``
    int32, and every rank's per-expert counts and N, ``gathered [W, E+1]`` int64."""
    W, _ = group_size_and_rank(group)
    N, K = topk_ids.shape
    El, S = E // W, min(C, N)
    Cc = min(C, W * S)
    i32, i64, dev = torch.int32, torch.int64, x.device
    w_flat = topk_weights.reshape(-1)
    keep_local = permute.capacity_keep(topk_ids, topk_weights, E, S)
    assign_to_row, row_to_assign, _, tpe, _ = permute.expert_layout(topk_ids, E, rows_per_expert=S,
                                                                     keep=keep_local)
    counts = torch.cat([tpe.to(i64), torch.full((1,), N, dtype=i64, device=dev)])
    gathered = torch.empty(W, E + 1, dtype=i64, device=dev)
    dist.all_gather(list(gathered.unbind(0)), counts, group=group)
    x_rows = permute.gather_rows(x, row_to_assign, K)
    # Empty slots carry weight -1 (routing weights are >= 0), which marks them invalid.
    w_rows = torch.where(row_to_assign >= 0, w_flat[row_to_assign.long().clamp(min=0)],
                         torch.full((), -1.0, dtype=w_flat.dtype, device=dev))
    x_recv = _all_to_all(x_rows, None, None, group)
    w_recv = _all_to_all(w_rows, None, None, group)
    M = x_recv.shape[0]
    # Candidates of local expert j: W sources x S slots, in (source, slot) = global token order.
    cand = w_recv.view(W, El, S).transpose(0, 1).reshape(El, W * S)
    score = torch.where(cand >= 0, cand, torch.full((), float("-inf"), dtype=cand.dtype, device=dev))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    position = torch.empty_like(order).scatter_(1, order, torch.arange(W * S, device=dev).expand(El, W * S)
                                                .contiguous())
    kept = (position < C) & (cand >= 0)
    # Received row of candidate (j, c): source c // S, slot c % S. Unkept ones go to a spare entry.
    c = torch.arange(W * S, device=dev)
    recv_row = ((c // S) * (El * S) + (c % S)).view(1, -1) + (torch.arange(El, device=dev) * S).view(-1, 1)
    comp_row = torch.arange(El, device=dev).view(-1, 1) * Cc + position
    comp_to_recv = torch.full((El * Cc + 1,), -1, dtype=i32, device=dev).scatter_(
        0, torch.where(kept, comp_row, El * Cc).reshape(-1), recv_row.reshape(-1).to(i32))[:-1]
    recv_to_comp = torch.full((M + 1,), -1, dtype=i32, device=dev).scatter_(
        0, torch.where(kept, recv_row, M).reshape(-1),
        torch.where(kept, comp_row, -1).reshape(-1).to(i32))[:-1]
    x_comp = permute.gather_rows(x_recv, comp_to_recv, 1)
    w_comp = torch.where(comp_to_recv >= 0, w_recv[comp_to_recv.long().clamp(min=0)],
                         torch.zeros((), dtype=w_recv.dtype, device=dev))
    ids_comp = torch.arange(El, dtype=i32, device=dev).repeat_interleave(Cc)
    return x_comp, w_comp, ids_comp, comp_to_recv, recv_to_comp, assign_to_row, row_to_assign, gathered


def _dispatch_grads(grad_x_recv, grad_w_recv, recv_to_comp, assign_to_row, top_k: int, send_splits,
                    recv_splits, group):
    """Backward of the dispatch: the received rows' gradients (capacity: the compact rows', spread
    back over the received rows with ``recv_to_comp``) go back by the reverse all-to-all (both
    exchanges run on every rank, in this order), each token summing its K rows.
    Returns ``grad_x [N, D]`` and ``grad_topk_weights [N, K]``."""
    if recv_to_comp is not None:
        valid = recv_to_comp >= 0
        grad_w_recv = torch.where(valid, grad_w_recv[recv_to_comp.long().clamp(min=0)], 0)
        grad_x_recv = permute.combine_rows(grad_x_recv, recv_to_comp, 1, out_dtype=grad_x_recv.dtype)
    grad_rows = _all_to_all(grad_x_recv, send_splits, recv_splits, group)
    grad_w_rows = _all_to_all(grad_w_recv, send_splits, recv_splits, group)
    grad_x = permute.combine_rows(grad_rows, assign_to_row, top_k, out_dtype=grad_rows.dtype)
    grad_w = torch.where(assign_to_row >= 0, grad_w_rows[assign_to_row.long().clamp(min=0)], 0)
    return grad_x, grad_w.view(-1, top_k)


def _combine(y_recv, assign_to_row, top_k: int, send_splits, recv_splits, group, out_dtype,
             recv_to_comp=None):
    """The weighted rows back to their tokens: ``y_recv [M, D] -> out [N, D]`` (capacity: the compact
    rows, placed back as received rows first)."""
    if recv_to_comp is not None:
        y_recv = permute.combine_rows(y_recv, recv_to_comp, 1, out_dtype=y_recv.dtype)
    y_rows = _all_to_all(y_recv, send_splits, recv_splits, group)
    return permute.combine_rows(y_rows, assign_to_row, top_k, out_dtype=out_dtype)


def _combine_grad(grad_out, row_to_assign, top_k: int, send_splits, recv_splits, group, comp_to_recv=None):
    """Backward of ``_combine``: ``grad_out [N, D] -> grad_y_recv [M, D]`` (or the compact rows')."""
    grad_rows = permute.gather_rows(grad_out.contiguous(), row_to_assign, top_k)
    grad_recv = _all_to_all(grad_rows, recv_splits, send_splits, group)
    return grad_recv if comp_to_recv is None else permute.gather_rows(grad_recv, comp_to_recv, 1)


class _Dispatch(torch.autograd.Function):
    """Sends each assignment's row of ``x`` and its routing weight to the expert's owner.

    ``x [N, D]``, ``topk_weights [N, K]`` -> ``x_recv [M, D]``, ``w_recv [M]`` and the local expert
    of each received row ``ids_recv [M]`` int32 (non-differentiable). Backward: the received rows'
    gradients go back by the reverse all-to-all and each token sums its K rows.
    """

    @staticmethod
    def forward(ctx, x, topk_weights, topk_ids, block_counts, block_n, options: MoEOptions, group,
                state: _State):
        W, _ = group_size_and_rank(group)
        N, K = topk_ids.shape
        E = state.num_experts
        if options.capacity_factor is None:
            x_recv, w_recv, ids_recv, assign_to_row, row_to_assign, gathered, send_splits, recv_splits = (
                _dropless_dispatch(x, topk_weights, topk_ids, block_counts, block_n, E, group))
            comp_to_recv = recv_to_comp = None
            dropped = torch.zeros((), dtype=torch.int32, device=x.device)
        else:
            C = options.capacity(W * N, E)
            x_recv, w_recv, ids_recv, comp_to_recv, recv_to_comp, assign_to_row, row_to_assign, gathered = (
                _capacity_dispatch(x, topk_weights, topk_ids, E, C, group))
            send_splits = recv_splits = None
            dropped = (gathered[:, :E].sum(0) - C).clamp(min=0).sum().to(torch.int32)
        state.top_k, state.assign_to_row, state.row_to_assign = K, assign_to_row, row_to_assign
        state.send_splits, state.recv_splits = send_splits, recv_splits
        state.comp_to_recv, state.recv_to_comp = comp_to_recv, recv_to_comp
        state.tokens_per_expert = gathered[:, :E].sum(0).to(torch.int32)
        state.num_tokens = gathered[:, E].sum()
        state.dropped = dropped
        state.recv_rows = x_recv.shape[0]
        state.x_recv_meta, state.w_recv_meta = x_recv.new_empty(0, x.shape[1]), w_recv.new_empty(0)
        ctx.state, ctx.group = state, group
        ctx.mark_non_differentiable(ids_recv)
        ctx.set_materialize_grads(False)
        return x_recv, w_recv, ids_recv

    @staticmethod
    def backward(ctx, grad_x_recv, grad_w_recv, _):
        s, group = ctx.state, ctx.group
        # Both exchanges run on every rank, in this order, whatever gradients arrived.
        if grad_x_recv is None:
            grad_x_recv = s.x_recv_meta.new_zeros(s.recv_rows, s.x_recv_meta.shape[1])
        if grad_w_recv is None:
            grad_w_recv = s.w_recv_meta.new_zeros(s.recv_rows)
        grad_x, grad_w = _dispatch_grads(grad_x_recv, grad_w_recv, s.recv_to_comp, s.assign_to_row, s.top_k,
                                         s.send_splits, s.recv_splits, group)
        return grad_x, grad_w, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """Sends the weighted expert outputs back and sums each token's rows: ``y_recv [M, D] -> [N, D]``."""

    @staticmethod
    def forward(ctx, y_recv, group, state: _State, out_dtype):
        ctx.state, ctx.group = state, group
        return _combine(y_recv, state.assign_to_row, state.top_k, state.send_splits, state.recv_splits, group,
                        out_dtype, state.recv_to_comp)

    @staticmethod
    def backward(ctx, grad_out):
        s = ctx.state
        return _combine_grad(grad_out, s.row_to_assign, s.top_k, s.send_splits, s.recv_splits, ctx.group,
                             s.comp_to_recv), None, None, None


# ---------------------------------------------------------------------------------------------
# torch.compile: the same steps as custom ops (collectives inside, the eager path's helpers)
# ---------------------------------------------------------------------------------------------


def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("flashfusemoe::ep_route", mutates_args=())
def _ep_route(x: Tensor, router_weight: Tensor, expert_bias: Optional[Tensor], top_k: int,  # noqa: UP045
              score_func: str, norm_topk_prob: bool, n_group: int, topk_group: int,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    logits, ids, weights = routing.route_forward(x, router_weight, expert_bias, top_k, score_func,
                                                 norm_topk_prob, n_group or None, topk_group or None, scale)
    return logits, weights, ids


@_ep_route.register_fake
def _(x, router_weight, expert_bias, top_k, *args):
    cdt = compute_dtype(x.dtype)
    N, E = x.shape[0], router_weight.shape[0]
    return (x.new_empty(N, E, dtype=cdt), x.new_empty(N, top_k, dtype=cdt),
            x.new_empty(N, top_k, dtype=torch.int32))


@torch.library.custom_op("flashfusemoe::ep_route_backward", mutates_args=())
def _ep_route_backward(x: Tensor, router_weight: Tensor, logits: Tensor, ids: Tensor,
                       grad_logits: Optional[Tensor], grad_weights: Optional[Tensor],  # noqa: UP045
                       score_func: str, norm_topk_prob: bool, scale: float) -> tuple[Tensor, Tensor]:
    return _route_grads(x, router_weight, logits, ids, grad_logits, grad_weights, score_func, norm_topk_prob,
                        scale)


@_ep_route_backward.register_fake
def _(x, router_weight, *args):
    return torch.empty_like(x), torch.empty_like(router_weight)


def _ep_route_setup(ctx, inputs, output):
    x, router_weight = inputs[:2]
    ctx.args = (inputs[4], inputs[5], inputs[8])  # score_func, norm_topk_prob, scale
    ctx.save_for_backward(x, router_weight, output[0], output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _ep_route_grad(ctx, grad_logits, grad_weights, _):
    x, router_weight, logits, ids = ctx.saved_tensors
    grads = _ep_route_backward(x, router_weight, logits, ids, grad_logits, grad_weights, *ctx.args)
    return (*grads, *([None] * 7))


_ep_route.register_autograd(_ep_route_grad, setup_context=_ep_route_setup)


@torch.library.custom_op("flashfusemoe::ep_dispatch_capacity", mutates_args=())
def _ep_dispatch(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, group_name: str, world_size: int,
                 num_experts: int, capacity: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _capacity_dispatch(x, topk_weights, topk_ids, num_experts, capacity, _group(group_name))


@_ep_dispatch.register_fake
def _(x, topk_weights, topk_ids, group_name, world_size, num_experts, capacity):
    N, K = topk_ids.shape
    S = min(capacity, N)
    M, Mc = num_experts * S, num_experts // world_size * min(capacity, world_size * S)
    i32 = torch.int32
    return (x.new_empty(Mc, x.shape[1]), topk_weights.new_empty(Mc), x.new_empty(Mc, dtype=i32),
            x.new_empty(Mc, dtype=i32), x.new_empty(M, dtype=i32), x.new_empty(N * K, dtype=i32),
            x.new_empty(M, dtype=i32), x.new_empty(world_size, num_experts + 1, dtype=torch.int64))


@torch.library.custom_op("flashfusemoe::ep_dispatch_capacity_backward", mutates_args=())
def _ep_dispatch_backward(grad_x_recv: Tensor, grad_w_recv: Tensor, recv_to_comp: Tensor,
                          assign_to_row: Tensor, group_name: str, top_k: int) -> tuple[Tensor, Tensor]:
    return _dispatch_grads(grad_x_recv, grad_w_recv, recv_to_comp, assign_to_row, top_k, None, None,
                           _group(group_name))


@_ep_dispatch_backward.register_fake
def _(grad_x_recv, grad_w_recv, recv_to_comp, assign_to_row, group_name, top_k):
    N = assign_to_row.shape[0] // top_k
    return grad_x_recv.new_empty(N, grad_x_recv.shape[1]), grad_w_recv.new_empty(N, top_k)


def _register_dispatch_autograd(dispatch, dispatch_backward, layout_outputs: tuple[int, int]) -> None:
    """Autograd of an EP dispatch op ``(x, topk_weights, topk_ids, group_name, ...)``: its outputs 0
    and 1 (the received rows and weights) are differentiable, and ``dispatch_backward(grad_x_recv,
    grad_w_recv, *layout, group_name, top_k)`` returns the gradients of x and topk_weights, with
    ``layout`` the two outputs at ``layout_outputs`` (unused gradients as zeros)."""

    def setup(ctx, inputs, output):
        ctx.args = (inputs[3], inputs[2].shape[1])  # group_name, top_k
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*(output[i] for i in layout_outputs), output[0], output[1])
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)

    def grad(ctx, grad_x_recv, grad_w_recv, *_):
        *layout, x_recv, w_recv = ctx.saved_tensors
        grad_x_recv = torch.zeros_like(x_recv) if grad_x_recv is None else grad_x_recv
        grad_w_recv = torch.zeros_like(w_recv) if grad_w_recv is None else grad_w_recv
        grads = dispatch_backward(grad_x_recv, grad_w_recv, *layout, *ctx.args)
        return (*grads, *([None] * (ctx.num_inputs - len(grads))))

    dispatch.register_autograd(grad, setup_context=setup)


_register_dispatch_autograd(_ep_dispatch, _ep_dispatch_backward, (4, 5))  # recv_to_comp, assign_to_row


@torch.library.custom_op("flashfusemoe::ep_combine_capacity", mutates_args=())
def _ep_combine(y_comp: Tensor, assign_to_row: Tensor, row_to_assign: Tensor, comp_to_recv: Tensor,
                recv_to_comp: Tensor, group_name: str, top_k: int) -> Tensor:
    return _combine(y_comp, assign_to_row, top_k, None, None, _group(group_name), y_comp.dtype, recv_to_comp)


@_ep_combine.register_fake
def _(y_comp, assign_to_row, row_to_assign, comp_to_recv, recv_to_comp, group_name, top_k):
    return y_comp.new_empty(assign_to_row.shape[0] // top_k, y_comp.shape[1])


@torch.library.custom_op("flashfusemoe::ep_combine_capacity_backward", mutates_args=())
def _ep_combine_backward(grad_out: Tensor, row_to_assign: Tensor, comp_to_recv: Tensor, group_name: str,
                         top_k: int) -> Tensor:
    return _combine_grad(grad_out, row_to_assign, top_k, None, None, _group(group_name), comp_to_recv)


@_ep_combine_backward.register_fake
def _(grad_out, row_to_assign, comp_to_recv, group_name, top_k):
    return grad_out.new_empty(comp_to_recv.shape[0], grad_out.shape[1])


def _ep_combine_setup(ctx, inputs, output):
    ctx.args = (inputs[5], inputs[6])  # group_name, top_k
    ctx.save_for_backward(inputs[2], inputs[3])  # row_to_assign, comp_to_recv


def _ep_combine_grad(ctx, grad_out):
    row_to_assign, comp_to_recv = ctx.saved_tensors
    return _ep_combine_backward(grad_out, row_to_assign, comp_to_recv, *ctx.args), *([None] * 6)


_ep_combine.register_autograd(_ep_combine_grad, setup_context=_ep_combine_setup)


@torch.library.custom_op("flashfusemoe::ep_dispatch_dropless", mutates_args=())
def _ep_dispatch_dl(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, group_name: str, world_size: int,
                    num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x_recv, w_recv, ids_recv, assign_to_row, row_to_assign, gathered, send, recv = _dropless_dispatch(
        x, topk_weights, topk_ids, None, 0, num_experts, _group(group_name))
    # On the host, so that the ops downstream read the split sizes without a device sync.
    splits = torch.tensor([send, recv], dtype=torch.int64)
    return x_recv, w_recv, ids_recv, assign_to_row, row_to_assign, gathered, splits


@_ep_dispatch_dl.register_fake
def _(x, topk_weights, topk_ids, group_name, world_size, num_experts):
    N, K = topk_ids.shape
    M = torch.library.get_ctx().new_dynamic_size()
    i32 = torch.int32
    return (x.new_empty(M, x.shape[1]), topk_weights.new_empty(M), x.new_empty(M, dtype=i32),
            x.new_empty(N * K, dtype=i32), x.new_empty(N * K, dtype=i32),
            x.new_empty(world_size, num_experts + 1, dtype=torch.int64),
            torch.empty(2, world_size, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("flashfusemoe::ep_dispatch_dropless_backward", mutates_args=())
def _ep_dispatch_dl_backward(grad_x_recv: Tensor, grad_w_recv: Tensor, assign_to_row: Tensor, splits: Tensor,
                             group_name: str, top_k: int) -> tuple[Tensor, Tensor]:
    send, recv = splits.tolist()
    return _dispatch_grads(grad_x_recv, grad_w_recv, None, assign_to_row, top_k, send, recv,
                           _group(group_name))


@_ep_dispatch_dl_backward.register_fake
def _(grad_x_recv, grad_w_recv, assign_to_row, splits, group_name, top_k):
    N = assign_to_row.shape[0] // top_k
    return grad_x_recv.new_empty(N, grad_x_recv.shape[1]), grad_w_recv.new_empty(N, top_k)


_register_dispatch_autograd(_ep_dispatch_dl, _ep_dispatch_dl_backward, (3, 6))  # assign_to_row, splits


@torch.library.custom_op("flashfusemoe::ep_combine_dropless", mutates_args=())
def _ep_combine_dl(y_recv: Tensor, assign_to_row: Tensor, row_to_assign: Tensor, splits: Tensor,
                   group_name: str, top_k: int) -> Tensor:
    send, recv = splits.tolist()
    return _combine(y_recv, assign_to_row, top_k, send, recv, _group(group_name), y_recv.dtype)


@_ep_combine_dl.register_fake
def _(y_recv, assign_to_row, row_to_assign, splits, group_name, top_k):
    return y_recv.new_empty(assign_to_row.shape[0] // top_k, y_recv.shape[1])


@torch.library.custom_op("flashfusemoe::ep_combine_dropless_backward", mutates_args=())
def _ep_combine_dl_backward(grad_out: Tensor, row_to_assign: Tensor, splits: Tensor, y_recv_rows: Tensor,
                            group_name: str, top_k: int) -> Tensor:
    send, recv = splits.tolist()
    return _combine_grad(grad_out, row_to_assign, top_k, send, recv, _group(group_name))


@_ep_combine_dl_backward.register_fake
def _(grad_out, row_to_assign, splits, y_recv_rows, group_name, top_k):
    return grad_out.new_empty(y_recv_rows.shape[0], grad_out.shape[1])


def _ep_combine_dl_setup(ctx, inputs, output):
    ctx.args = (inputs[4], inputs[5])  # group_name, top_k
    # A [M, 0] view carries the received row count M (unbacked under tracing) to the backward.
    ctx.save_for_backward(inputs[2], inputs[3], inputs[0][:, :0])


def _ep_combine_dl_grad(ctx, grad_out):
    row_to_assign, splits, rows = ctx.saved_tensors
    return _ep_combine_dl_backward(grad_out, row_to_assign, splits, rows, *ctx.args), *([None] * 5)


_ep_combine_dl.register_autograd(_ep_combine_dl_grad, setup_context=_ep_combine_dl_setup)


def _ep_traced(x2d, router_weight, w_up, w_down, expert_bias, options: MoEOptions, group, W: int, E: int):
    """The EP call through the custom ops above (what ``torch.compile`` traces)."""
    N, K = x2d.shape[0], options.top_k
    logits, topk_weights, topk_ids = _ep_route(
        x2d, router_weight, expert_bias, K, options.score_func, options.norm_topk_prob,
        options.n_group or 0, options.topk_group or 0, float(options.routed_scaling_factor))
    name = group.group_name
    state = _State()
    if options.capacity_factor is None:
        x_recv, w_recv, ids_recv, assign_to_row, row_to_assign, gathered, splits = _ep_dispatch_dl(
            x2d, topk_weights, topk_ids, name, W, E)
        y_recv = _local_experts(x_recv, ids_recv, w_recv, w_up, w_down, options)
        out = _ep_combine_dl(y_recv, assign_to_row, row_to_assign, splits, name, K)
        state.tokens_per_expert = gathered[:, :E].sum(0).to(torch.int32)
        state.num_tokens = gathered[:, E].sum()
        state.dropped = torch.zeros((), dtype=torch.int32, device=x2d.device)
        return out, logits, state
    C = options.capacity(W * N, E)
    x_comp, w_comp, ids_comp, comp_to_recv, recv_to_comp, assign_to_row, row_to_assign, gathered = (
        _ep_dispatch(x2d, topk_weights, topk_ids, name, W, E, C))
    y_comp = _local_experts(x_comp, ids_comp, w_comp, w_up, w_down, options)
    out = _ep_combine(y_comp, assign_to_row, row_to_assign, comp_to_recv, recv_to_comp, name, K)
    state.tokens_per_expert = gathered[:, :E].sum(0).to(torch.int32)
    state.num_tokens = gathered[:, E].sum()
    state.dropped = (state.tokens_per_expert - C).clamp(min=0).sum().to(torch.int32)
    return out, logits, state


# ---------------------------------------------------------------------------------------------
# The local experts
# ---------------------------------------------------------------------------------------------


def _local_experts(x_recv, ids_recv, w_recv, w_up, w_down, options: MoEOptions):
    """``y[m] = w_recv[m] * expert_{ids_recv[m]}(x_recv[m])`` for the received rows, differentiable
    in ``x_recv [M, D]``, ``w_recv [M]``, ``w_up [El, 2F, D]`` and ``w_down [El, D, F]``: the
    experts-only core (``flashfusemoe.moe_experts``), each received row a token with one assignment.
    The ids come from the count exchange, in range by construction: no id check, no host sync."""
    from flashfusemoe.experts import moe_experts

    return moe_experts(x_recv, ids_recv[:, None], w_recv[:, None], w_up, w_down,
                       activation=options.activation, gemm=options.gemm, recompute=options.recompute,
                       check_ids=False, distinct_ids=True)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def ep_moe_outputs(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None, group):
    """Validates and runs the expert-parallel MoE. Returns ``(out [..., D], logits [N, E], state)``:
    the custom ops when traced by ``torch.compile``, else the ``autograd.Function``s."""
    if not torch.compiler.is_compiling():
        return _ep_eager(x, router_weight, w_up, w_down, options, expert_bias=expert_bias, group=group)
    x, router_weight, w_up, w_down, x2d, (D, E, F, W) = _prepare(x, router_weight, w_up, w_down, expert_bias,
                                                              options, group)
    out, logits, state = _ep_traced(x2d, router_weight.contiguous(), w_up.contiguous(), w_down.contiguous(),
                                    expert_bias, options, group, W, E)
    return out.reshape(*x.shape[:-1], D), logits, state


def _prepare(x, router_weight, w_up, w_down, expert_bias, options, group):
    """Validation and autocast; returns the (cast) tensors, ``x2d [N, D]`` and ``(D, E, F, W)``."""
    dtype = autocast_dtype(x)
    D, E, F, W, _ = validate_ep_inputs(x, router_weight, w_up, w_down, expert_bias, options, group,
                                       autocast=dtype is not None)
    check_has_data("x", x)
    if dtype is not None:
        x, router_weight, w_up, w_down = (t.to(dtype) for t in (x, router_weight, w_up, w_down))
    x2d = x.reshape(-1, D).contiguous()
    _check_group_agrees(x2d.shape[0], D, E, F, W, options, x2d, group)
    return x, router_weight, w_up, w_down, x2d, (D, E, F, W)


def _ep_eager(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None, group):
    x, router_weight, w_up, w_down, x2d, (D, E, F, W) = _prepare(x, router_weight, w_up, w_down, expert_bias,
                                                              options, group)
    block = []
    logits, topk_weights, topk_ids = _Route.apply(x2d, router_weight.contiguous(), expert_bias, options,
                                                  block)
    state = _State()
    state.num_experts = E
    x_recv, w_recv, ids_recv = _Dispatch.apply(x2d, topk_weights, topk_ids, block[0], block[1], options,
                                               group, state)
    y_recv = _local_experts(x_recv, ids_recv, w_recv, w_up.contiguous(), w_down.contiguous(), options)
    out = _Combine.apply(y_recv, group, state, x2d.dtype)
    return out.reshape(*x.shape[:-1], D), logits, state


def ep_aux(logits: torch.Tensor, state: _State, score_func: str) -> dict:
    """This rank's shares of the group's aux losses, and the group's ``tokens_per_expert`` and
    ``dropped_tokens`` (see the module docstring)."""
    N, E = logits.shape
    total = state.num_tokens.clamp(min=1).to(logits.dtype)
    if score_func == "softmax":
        probs = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    fraction = state.tokens_per_expert.to(logits.dtype) / total
    load_balance = E * (fraction * probs.sum(dim=0)).sum() / total
    z_loss = torch.logsumexp(logits, dim=-1).square().sum() / total
    return {"load_balance_loss": load_balance, "z_loss": z_loss,
            "tokens_per_expert": state.tokens_per_expert, "dropped_tokens": state.dropped}


def ep_moe(x, router_weight, w_up, w_down, options: MoEOptions, *, expert_bias=None, group,
           return_aux=False):
    """``fused_moe(..., ep_group=group)``: ``out`` or ``(out, aux)``."""
    out, logits, state = ep_moe_outputs(x, router_weight, w_up, w_down, options, expert_bias=expert_bias,
                                        group=group)
    return (out, ep_aux(logits, state, options.score_func)) if return_aux else out


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------

EXPERT_KEYS = ("w_up", "w_down")


def shard_state_dict(state_dict: dict, rank: int, world_size: int, *, keys=EXPERT_KEYS) -> dict:
    """Rank ``rank``'s shard of a full state dict: the expert weights under ``keys`` (default: a
    bare ``MoELayer``'s; ``layer.expert_keys(model)`` for a model) sliced to the rank's ``E/W`` experts,
    everything else as is (not copied)."""
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict has no expert weights {missing}")
    out = dict(state_dict)
    for key in keys:
        value = state_dict[key]
        E = value.shape[0]
        if E % world_size:
            raise ValueError(f"{key} has {E} experts, not divisible by world_size={world_size}")
        per = E // world_size
        out[key] = value[rank * per:(rank + 1) * per].clone()
    return out


def gather_state_dict(state_dict: dict, group, *, keys=EXPERT_KEYS) -> dict:
    """The full state dict from every rank's shard: the expert weights under ``keys`` gathered over
    ``group`` in rank order. Collective: every rank calls it and gets the result."""
    W, _ = group_size_and_rank(group)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict has no expert weights {missing}")
    out = dict(state_dict)
    for key in keys:
        value = state_dict[key].contiguous()
        parts = [torch.empty_like(value) for _ in range(W)]
        dist.all_gather(parts, value, group=group)
        out[key] = torch.cat(parts, 0)
    return out
