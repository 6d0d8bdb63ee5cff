"""Router: logits GEMM, scores, (bias, group-limited) top-k selection and routing weights.

Semantics are those of ``docs/design.md`` (Routing semantics). Routing math runs in fp32
for bf16/fp16/fp32 inputs and in fp64 for fp64 inputs.
"""

import torch
import triton
import triton.language as tl

from flashfusemoe import kernels
from flashfusemoe.kernels import (
    INTERP,
    cdiv,
    compute_dtype,
    deliver,
    next_power_of_2,
    out_buffer,
    use_triton,
)
from flashfusemoe.kernels.launch import fast_launch

# Finite "minus infinity" for masked selection scores: -inf would turn sums into NaN.
_NEG = tl.constexpr(-1.0e30)
# Where a NaN selection score goes (a NaN in x, the router or the bias): below every number, above
# the masked columns, so a token picks K distinct real experts even when all its scores are NaN.
_NAN_SEL = tl.constexpr(-0.5e30)
# A picked column's selection key: below the key of every float (int64's minimum).
_PICKED_KEY = tl.constexpr(-(2**63))


def _block_e(E: int) -> int:
    return max(16, next_power_of_2(E))


def _block_n(N: int, block_e: int, interpret: bool, max_tile: int) -> int:
    if interpret:
        # The interpreter pays per program: one wide program is cheapest.
        return max(16, min(128, next_power_of_2(N)))
    return max(16, min(64, max_tile // block_e))


def _fwd_config(N: int, block_e: int, dtype: torch.dtype, interpret: bool) -> dict | None:
    """Block sizes and launch options of the forward kernel (tuned on H200, bf16, E in 64..256).

    None when one pipeline stage cannot fit in shared memory (e.g. fp64 with E > 1024).
    """
    block_n = _block_n(N, block_e, interpret, 16384)
    if interpret:
        return dict(BLOCK_N=block_n, BLOCK_D=32, num_warps=4, num_stages=1)
    # Keep the router-weight tile within 32 KiB of shared memory per pipeline stage.
    block_d = max(16, min(64, 32768 // (block_e * dtype.itemsize)))
    stage_bytes = (block_n + block_e) * block_d * dtype.itemsize
    if stage_bytes > 192 * 1024:
        return None
    num_stages = max(1, min(4, 160 * 1024 // stage_bytes))
    num_warps = 8 if block_n * block_e >= 16384 else 4
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def _scores(logits, col_mask, SIGMOID: tl.constexpr):
    """softmax over the real experts (``col_mask``) or sigmoid of ``logits [BN, BE]``."""
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-logits))
    else:
        z = tl.where(col_mask, logits, _NEG)
        m = tl.max(z, axis=1)
        p = tl.where(col_mask, tl.exp(z - m[:, None]), 0.0)
        s = p / tl.sum(p, axis=1)[:, None]
    return s


@triton.jit
def _argmax_low(vals, cols, BLOCK_E: tl.constexpr):
    """Per row, the index of the largest value; ties go to the lowest column."""
    mx = tl.max(vals, axis=1)
    return tl.min(tl.where(vals == mx[:, None], cols[None, :], BLOCK_E), axis=1)


@triton.jit
def _selection_keys(vals, cols, BLOCK_E: tl.constexpr):
    """int64 keys of fp32 ``vals [BN, BE]`` ordered as the values, equal values by the lower
    column first: the high word maps the float's bits to a signed int of the same order, the low
    word is ``BLOCK_E - 1 - col``. One max reduction over a row then yields both its largest value
    and that value's lowest column. (No NaN, and no -0.0, which would rank below +0.0: selection
    scores are scores >= +0.0 plus a bias, never -0.0.)"""
    bits = vals.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (BLOCK_E - 1 - cols)[None, :].to(tl.int64)


@fast_launch
def _route_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    logits_ptr,
    ids_ptr,
    weights_ptr,
    counts_ptr,
    N,
    D,
    E,
    group_size,
    scale: tl.float64,
    K: tl.constexpr,
    COUNTS: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    NORM: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One program routes ``BLOCK_N`` tokens. ``N_GROUP == 0`` disables group limiting. PACKED
    (fp32 routing): each pick is one max over ``_selection_keys``, else (fp64) ``_argmax_low``."""
    acc_ty = logits_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    dd = tl.arange(0, BLOCK_D)

    # Router GEMM: logits[BLOCK_N, BLOCK_E] = x[rows] @ w.T
    acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_mask = d < D
        xt = tl.load(
            x_ptr + rows64[:, None] * D + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + cols.to(tl.int64)[None, :] * D + d[:, None],
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        if INTERP:
            # bf16 tl.dot is wrong in the interpreter; fp32 is exact enough.
            acc = tl.dot(xt.to(acc_ty), wt.to(acc_ty), acc, input_precision="ieee", out_dtype=acc_ty)
        elif DOT_IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee", out_dtype=acc_ty)
        else:
            acc = tl.dot(xt, wt, acc)

    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(logits_ptr + rows64[:, None] * E + cols[None, :], acc, mask=out_mask)

    s = _scores(acc, col_mask[None, :], SIGMOID)
    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(acc_ty)[None, :]
    sel = tl.where(sel == sel, sel, _NAN_SEL)
    allowed = col_mask[None, :] & (rows >= 0)[:, None]

    if N_GROUP > 0:
        # Group score: sum of the two largest selection scores of the group (largest if size 1).
        gcols = tl.arange(0, BLOCK_G)
        gscore = tl.zeros([BLOCK_N, BLOCK_G], dtype=acc_ty)
        for g in range(N_GROUP):
            in_g = (cols >= g * group_size) & (cols < (g + 1) * group_size)
            v = tl.where(in_g[None, :], sel, _NEG)
            i1 = _argmax_low(v, cols, BLOCK_E)
            m1 = tl.max(v, axis=1)
            m2 = tl.max(tl.where(cols[None, :] == i1[:, None], _NEG, v), axis=1)
            gs = m1 + tl.where(group_size > 1, m2, 0.0)
            gscore = tl.where(gcols[None, :] == g, gs[:, None], gscore)
        # Group g is kept when fewer than TOPK_GROUP groups beat it (higher, or equal and lower index).
        gvalid = gcols < N_GROUP
        allowed = (rows < 0)[:, None] & col_mask[None, :]
        for g in range(N_GROUP):
            gs = tl.sum(tl.where(gcols[None, :] == g, gscore, 0.0), axis=1)
            beats = (gscore > gs[:, None]) | ((gscore == gs[:, None]) & (gcols[None, :] < g))
            rank = tl.sum((beats & gvalid[None, :]).to(tl.int32), axis=1)
            in_g = (cols >= g * group_size) & (cols < (g + 1) * group_size)
            allowed = allowed | (in_g[None, :] & (rank < TOPK_GROUP)[:, None])

    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    wts = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_ty)
    chosen = (rows < 0)[:, None] & col_mask[None, :]
    if PACKED:  # one reduction per pick instead of two; a picked column drops below every key
        keys = _selection_keys(tl.where(allowed, sel, _NEG), cols, BLOCK_E)
    for k in range(K):
        if PACKED:
            idx = BLOCK_E - 1 - (tl.max(keys, axis=1) & 0xFFFFFFFF).to(tl.int32)
        else:
            idx = _argmax_low(tl.where(allowed, sel, _NEG), cols, BLOCK_E)
        hit = cols[None, :] == idx[:, None]
        chosen = chosen | hit
        r = tl.sum(tl.where(hit, s, 0.0), axis=1)
        if PACKED:
            keys = tl.where(hit, _PICKED_KEY, keys)
        else:
            allowed = allowed & (~hit)
        ids = tl.where(kcols[None, :] == k, idx[:, None], ids)
        wts = tl.where(kcols[None, :] == k, r[:, None], wts)
    if NORM:
        wts = wts / tl.sum(wts, axis=1)[:, None]
    wts = (wts * scale).to(acc_ty)

    k_mask = row_mask[:, None] & (kcols < K)[None, :]
    k_offs = rows64[:, None] * K + kcols[None, :]
    tl.store(ids_ptr + k_offs, ids, mask=k_mask)
    tl.store(weights_ptr + k_offs, wts, mask=k_mask)
    if COUNTS:  # this token block's assignments per expert, for permute.layout_and_gather
        block_counts = tl.sum((chosen & row_mask[:, None]).to(tl.int32), axis=0)
        tl.store(counts_ptr + pid * E + cols, block_counts, mask=cols < E)


@fast_launch
def _route_bwd_kernel(
    logits_ptr,
    ids_ptr,
    grad_w_row_ptr,
    assign_to_row_ptr,
    grad_ext_ptr,
    grad_logits_ptr,
    N,
    E,
    scale: tl.float64,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    NORM: tl.constexpr,
    HAS_EXT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad_logits for ``BLOCK_N`` tokens from the weight gradients of their assignments."""
    acc_ty = logits_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows64[:, None] * E + cols[None, :]
    logits = tl.load(logits_ptr + offs, mask=mask, other=0.0)
    s = _scores(logits, col_mask[None, :], SIGMOID)

    kcols = tl.arange(0, BLOCK_K)
    k_mask = row_mask[:, None] & (kcols < K)[None, :]
    k_offs = rows64[:, None] * K + kcols[None, :]
    ids = tl.load(ids_ptr + k_offs, mask=k_mask, other=0)
    arow = tl.load(assign_to_row_ptr + k_offs, mask=k_mask, other=-1)
    g = tl.load(grad_w_row_ptr + arow.to(tl.int64), mask=k_mask & (arow >= 0), other=0.0).to(acc_ty)

    # r[n, k] = scores[n, ids[n, k]]; w = scale * r / sum(r) (NORM) or scale * r.
    if NORM:
        r = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_ty)
        for k in range(K):
            idk = tl.sum(tl.where(kcols[None, :] == k, ids, 0), axis=1)
            rk = tl.sum(tl.where(cols[None, :] == idk[:, None], s, 0.0), axis=1)
            r = tl.where(kcols[None, :] == k, rk[:, None], r)
        denom = tl.sum(r, axis=1)
        gr = tl.sum(g * r, axis=1) / denom
        dr = (scale * (g - gr[:, None]) / denom[:, None]).to(acc_ty)
    else:
        dr = (scale * g).to(acc_ty)

    ds = tl.zeros([BLOCK_N, BLOCK_E], dtype=acc_ty)
    for k in range(K):
        idk = tl.sum(tl.where(kcols[None, :] == k, ids, 0), axis=1)
        drk = tl.sum(tl.where(kcols[None, :] == k, dr, 0.0), axis=1)
        ds = tl.where(cols[None, :] == idk[:, None], drk[:, None], ds)

    if SIGMOID:
        dl = ds * s * (1.0 - s)
    else:
        dl = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    if HAS_EXT:
        dl += tl.load(grad_ext_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(grad_logits_ptr + offs, dl.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _scores_torch(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    return torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, dim=-1)


def _check_groups(E: int, top_k: int, n_group, topk_group) -> None:
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group must be both given or both None")
    if n_group is not None:
        if n_group < 1 or E % n_group != 0:
            raise ValueError(f"n_group={n_group} must divide the number of experts {E}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        if topk_group * (E // n_group) < top_k:
            raise ValueError(f"topk_group={topk_group} groups of {E // n_group} hold fewer than {top_k}")


def _route_forward_torch(
    x, router_weight, expert_bias, top_k, score_func, norm_topk_prob, n_group, topk_group, scaling
):
    cdt = compute_dtype(x.dtype)
    N, E = x.shape[0], router_weight.shape[0]
    logits = x.to(cdt) @ router_weight.to(cdt).T
    scores = _scores_torch(logits, score_func)
    sel = scores if expert_bias is None else scores + expert_bias.to(cdt)
    sel = sel.nan_to_num(nan=torch.finfo(cdt).min, posinf=float("inf"), neginf=float("-inf"))  # as the kernel
    if n_group is not None:
        G = E // n_group
        grouped = sel.view(N, n_group, G)
        top2 = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., : min(2, G)]
        gscore = top2.sum(-1)
        keep = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        gmask = torch.zeros(N, n_group, dtype=torch.bool, device=x.device).scatter_(1, keep, True)
        sel = sel.masked_fill(~gmask.repeat_interleave(G, dim=1), float("-inf"))
    ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return logits, ids.to(torch.int32), w * scaling


def route_forward(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    score_func: str,
    norm_topk_prob: bool,
    n_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
    with_block_counts: bool = False,
    *,
    logits_out: torch.Tensor | None = None,
    ids_out: torch.Tensor | None = None,
    weights_out: torch.Tensor | None = None,
):
    """Route ``x [N, D]`` with ``router_weight [E, D]`` (and selection bias ``[E]``).

    Returns ``logits [N, E]``, ``topk_ids [N, K]`` int32 in selection order and
    ``topk_weights [N, K]``; logits and weights are fp64 for fp64 ``x``, else fp32, each in its
    ``*_out`` buffer when given.
    ``with_block_counts`` adds ``block_counts [cdiv(N, block_n), E]`` int32 (assignments of
    each block of ``block_n`` tokens per expert) and ``block_n``; ``(None, 0)`` on the torch path.
    """
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    N, D = x.shape
    E = router_weight.shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}]")
    _check_groups(E, top_k, n_group, topk_group)
    cdt = compute_dtype(x.dtype)
    block_e = _block_e(E)
    cfg = _fwd_config(N, block_e, x.dtype, kernels.INTERPRET)
    if not use_triton(x) or cfg is None or N == 0:
        routed = _route_forward_torch(
            x, router_weight, expert_bias, top_k, score_func, norm_topk_prob, n_group, topk_group,
            routed_scaling_factor,
        )  # fmt: skip
        outs = {"logits_out": logits_out, "ids_out": ids_out, "weights_out": weights_out}
        routed = tuple(deliver(r, o, name) for r, (name, o) in zip(routed, outs.items(), strict=True))
        return (*routed, None, 0) if with_block_counts else routed
    logits = out_buffer(logits_out, (N, E), cdt, x.device, "logits_out")
    ids = out_buffer(ids_out, (N, top_k), torch.int32, x.device, "ids_out")
    weights = out_buffer(weights_out, (N, top_k), cdt, x.device, "weights_out")
    num_blocks = cdiv(N, cfg["BLOCK_N"])
    counts = torch.empty(num_blocks if with_block_counts else 0, E, dtype=torch.int32, device=x.device)
    x = x.contiguous()
    router_weight = router_weight.contiguous()
    ng = 0 if n_group is None else n_group
    _route_fwd_kernel[(num_blocks,)](
        x,
        router_weight,
        expert_bias.contiguous() if expert_bias is not None else logits,
        logits,
        ids,
        weights,
        counts,
        N,
        D,
        E,
        E // max(ng, 1),
        float(routed_scaling_factor),
        K=top_k,
        COUNTS=with_block_counts,
        SIGMOID=score_func == "sigmoid",
        HAS_BIAS=expert_bias is not None,
        N_GROUP=ng,
        TOPK_GROUP=0 if topk_group is None else topk_group,
        NORM=bool(norm_topk_prob),
        DOT_IEEE=x.dtype in (torch.float32, torch.float64),
        PACKED=cdt == torch.float32,
        BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(top_k),
        BLOCK_G=next_power_of_2(max(ng, 1)),
        **cfg,
    )
    if with_block_counts:
        return logits, ids, weights, counts, cfg["BLOCK_N"]
    return logits, ids, weights


def _route_backward_torch(
    logits, topk_ids, grad_w_row, assign_to_row, grad_logits_ext, score_func, norm_topk_prob, scaling
):
    N, K = topk_ids.shape
    ids = topk_ids.long()
    arow = assign_to_row.long().view(N, K)
    g = torch.where(arow >= 0, grad_w_row.to(logits.dtype)[arow.clamp(min=0)], 0.0)
    s = _scores_torch(logits, score_func)
    if norm_topk_prob:
        r = s.gather(1, ids)
        denom = r.sum(-1, keepdim=True)
        dr = scaling * (g - (g * r).sum(-1, keepdim=True) / denom) / denom
    else:
        dr = scaling * g
    ds = torch.zeros_like(s).scatter_(1, ids, dr)
    if score_func == "sigmoid":
        dl = ds * s * (1.0 - s)
    else:
        dl = s * (ds - (ds * s).sum(-1, keepdim=True))
    if grad_logits_ext is not None:
        dl = dl + grad_logits_ext.to(logits.dtype)
    return dl


def route_backward(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    grad_w_row: torch.Tensor,
    assign_to_row: torch.Tensor,
    grad_logits_ext: torch.Tensor | None,
    score_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``grad_logits [N, E]`` from the routing-weight gradient of each row ``grad_w_row [R]``.

    ``assign_to_row [N*K]`` maps assignment ``n*K + k`` to its row (``-1``: dropped, no
    gradient); ``grad_logits_ext [N, E]`` (aux losses) is added when given. Computed in
    ``logits``' dtype and stored as ``out_dtype`` (default: ``logits``' dtype).
    """
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    out_dtype = logits.dtype if out_dtype is None else out_dtype
    if not use_triton(logits):
        grad_logits = _route_backward_torch(
            logits, topk_ids, grad_w_row, assign_to_row, grad_logits_ext, score_func, norm_topk_prob,
            routed_scaling_factor,
        )  # fmt: skip
        return grad_logits.to(out_dtype)
    N, E = logits.shape
    K = topk_ids.shape[1]
    grad_logits = torch.empty_like(logits, dtype=out_dtype)
    if N == 0:
        return grad_logits
    logits = logits.contiguous()
    topk_ids = topk_ids.contiguous()
    assign_to_row = assign_to_row.contiguous()
    if grad_logits_ext is not None:
        grad_logits_ext = grad_logits_ext.contiguous()
    block_e = _block_e(E)
    block_n = _block_n(N, block_e, kernels.INTERPRET, 4096)
    _route_bwd_kernel[(cdiv(N, block_n),)](
        logits,
        topk_ids,
        grad_w_row,
        assign_to_row,
        grad_logits_ext if grad_logits_ext is not None else logits,
        grad_logits,
        N,
        E,
        float(routed_scaling_factor),
        K=K,
        SIGMOID=score_func == "sigmoid",
        NORM=bool(norm_topk_prob),
        HAS_EXT=grad_logits_ext is not None,
        BLOCK_N=block_n,
        BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(K),
        num_warps=4,
    )
    return grad_logits
