"""Gathered expert GEMMs: token rows read by index inside the GEMM, GLU in the epilogues.

Layout (as ``permute.expert_layout`` / ``layout_and_gather`` with ``gemm="grouped"``): ``R``
expert-sorted rows; expert ``e`` owns rows ``[expert_ends[e-1], expert_ends[e])``;
``row_to_assign [R]`` int32 holds each row's assignment ``n*K + k`` (token ``n``), or ``-1`` for a
row without one (capacity drops, the tail past ``expert_ends[-1]``). No ``[R, D]`` copy of ``x`` or
``dy`` is ever made: the kernels read row ``r`` of the operand as ``src[row_to_assign[r] // K]``.

- ``up_proj_glu``: ``h = x_g @ w_up[e].T`` and ``a = act(h[:, :F]) * h[:, F:]``, gate and up
  accumulators in one program, ``h`` optionally stored.
- ``gathered_dgrad_glu``: ``da = dy_g @ w_down[e]`` and, in its epilogue, the backward of the
  routing-weighted GLU (``dh``, ``a * w``, the routing-weight gradient term).
- ``sorted_dgrad_glu``: the same on a ``dy`` already in expert order (``[R, D]``, TMA loads).
- ``gathered_mm``: ``dy_g @ w_down[e]`` alone (for ``activation.glu_backward`` after it).
- ``gathered_weight_grad``: ``out[e] = A_e.T @ B_e`` where ``A`` or ``B`` is gathered by token.

Each is usable on its own, so a caller can mix them with the unfused passes shape by shape.
The layout must be the dropless one (expert ``e`` starts where ``e - 1`` ends), not the padded
``gemm="bmm"`` layout.

Tiles never span two experts: program ``m`` of the grid (an upper bound ``cdiv(R, BLOCK_M) + E + 1``
on the tile count) finds its expert from ``expert_ends`` on the device, so nothing syncs with the
host. Rows of the tail past ``expert_ends[-1]`` and rows with ``row_to_assign == -1`` get exact
zeros in every per-row output. Launch configurations are fixed per shape (``_config``), not
autotuned: a per-process tuning choice could change the summation order from one run to the next,
and the tuning run would synchronise on first use. Every wrapper writes into caller-given
``*_out`` tensors when given (the JAX bridge's XLA buffers).

Triton path: CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``; fp16, bf16 and fp32
(fp32 with IEEE fp32 dots). fp64 and CPU tensors without the interpreter take the torch fallback,
which runs the unfused sequence (``permute.gather_rows``, ``grouped_gemm``, ``activation``).
Weights come through TMA tensor descriptors on sm90+ (16-bit, aligned, see ``_tma_ok``), else
through pointer loads.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from flashfusemoe.kernels import (
    INTERPRET,
    activation,
    cdiv,
    check_out,
    grouped_gemm,
    next_power_of_2,
    permute,
    use_triton,
)
from flashfusemoe.kernels.activation import _act, _act_and_grad, _check_activation
from flashfusemoe.kernels.grouped_gemm import _dot_acc, _weight_grad_tile
from flashfusemoe.kernels.launch import fast_launch

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(ends_ptr, pid_m, R, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile ``pid_m`` of the schedule: ``(expert, row0, row_end)``.

    Tiles ``0 .. T-1`` (``T = sum_e cdiv(count_e, BLOCK_M)``) cover the experts in order;
    the next ones cover the tail ``[expert_ends[E-1], R)`` with ``expert == E``; past those,
    ``row0 >= row_end`` (no work).
    """
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    ends = tl.load(ends_ptr + offs_e, mask=mask_e, other=0)
    starts = tl.load(ends_ptr + offs_e - 1, mask=mask_e & (offs_e > 0), other=0)
    tiles = tl.where(mask_e, (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    tile_start = tl.sum(tl.where(offs_e < expert, tiles, 0), axis=0)
    row_start = tl.sum(tl.where(offs_e == expert, starts, 0), axis=0)
    row_end = tl.sum(tl.where(offs_e == expert, ends, 0), axis=0)
    if expert >= E:  # the tail
        row_start = tl.load(ends_ptr + E - 1)
        row_end = R
    row0 = row_start + (pid_m - tile_start) * BLOCK_M
    return expert, row0, row_end


@triton.jit
def _gathered_rows(r2a_ptr, row0, row_end, expert, E, TOP_K, BLOCK_M: tl.constexpr):
    """Rows ``row0 + [0, BLOCK_M)``: ``(rows, in_rows, valid, asg, tok)``; ``valid`` rows have an
    assignment ``asg`` and a real expert, ``tok`` (int64) is their token (0 elsewhere)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    in_rows = rows < row_end
    asg = tl.load(r2a_ptr + rows, mask=in_rows, other=-1)
    # (tl.where, not `& (expert < E)`: Triton 3.9's interpreter rejects a mask and-ed with a scalar)
    valid = tl.where(expert < E, in_rows & (asg >= 0), False)
    tok = tl.where(valid, asg // TOP_K, 0).to(tl.int64)
    return rows, in_rows, valid, asg, tok


@fast_launch
def _up_glu_kernel(
    x_ptr,
    w_ptr,
    w_desc,
    r2a_ptr,
    ends_ptr,
    h_ptr,
    a_ptr,
    R,
    D,
    F,
    E,
    stride_x,
    stride_we,
    stride_wn,
    TOP_K,
    ACT: tl.constexpr,
    SAVE_H: tl.constexpr,
    SAVE_A: tl.constexpr,
    USE_TMA: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid ``((cdiv(R, BLOCK_M) + E + 1) * cdiv(F, BLOCK_N),)``, N-tiles of one row tile adjacent.

    ``w`` is ``[E, 2F, D]`` with unit stride along D; ``w_desc`` its ``[E*2F, D]`` descriptor with
    block ``[BLOCK_N, BLOCK_K]`` (USE_TMA). ``h`` ``[R, 2F]`` and ``a`` ``[R, F]`` contiguous.
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(F, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    expert, row0, row_end = _row_tile(ends_ptr, pid_m, R, E, BLOCK_M, BLOCK_E)
    if row0 >= row_end:
        return
    rows, in_rows, valid, asg, tok = _gathered_rows(r2a_ptr, row0, row_end, expert, E, TOP_K, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    x_ptrs = x_ptr + tok[:, None] * stride_x + ks[None, :]
    w_row = expert.to(tl.int64) * stride_we
    wg_ptrs = w_ptr + w_row + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    wu_ptrs = wg_ptrs + F * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(expert < E, D, 0)  # the tail does no GEMM
    for k0 in range(0, k_end, BLOCK_K):
        if EVEN_K:
            kmask = ks >= 0
            xa = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
        else:
            kmask = (k0 + ks) < D
            xa = tl.load(x_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        if USE_TMA:
            wg = w_desc.load([expert * 2 * F + n0, k0])
            wu = w_desc.load([expert * 2 * F + F + n0, k0])
        else:
            wmask = (cols < F)[:, None] & kmask[None, :]
            wg = tl.load(wg_ptrs, mask=wmask, other=0.0)
            wu = tl.load(wu_ptrs, mask=wmask, other=0.0)
        acc_g = _dot_acc(xa, wg.T, acc_g)
        acc_u = _dot_acc(xa, wu.T, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K

    # h is rounded to the output dtype first and `a` computed from the rounded values, as the
    # backward (which reads the stored or recomputed h) sees them.
    g = acc_g.to(h_ptr.dtype.element_ty)
    u = acc_u.to(h_ptr.dtype.element_ty)
    if SAVE_H:
        _store_rows(h_ptr, g, rows, in_rows, cols, F, 2 * F)
        _store_rows(h_ptr + F, u, rows, in_rows, cols, F, 2 * F)
    if SAVE_A:
        a = _act(g.to(tl.float32), ACT) * u.to(tl.float32)
        _store_rows(a_ptr, a, rows, in_rows, cols, F, F)


@fast_launch
def _dgrad_glu_kernel(
    dy_ptr,
    dy_desc,
    w_ptr,
    w_desc,
    h_ptr,
    r2a_ptr,
    ends_ptr,
    tw_ptr,
    dh_ptr,
    aw_ptr,
    gw_ptr,
    R,
    D,
    F,
    E,
    stride_dy,
    stride_we,
    stride_wd,
    stride_h,
    TOP_K,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    USE_TMA: tl.constexpr,
    DY_SORTED: tl.constexpr,
    DY_TMA: tl.constexpr,
    EVEN_K: tl.constexpr,
    N_ACC: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``da = dy_g @ w[e]`` (``w`` ``[E, D, F]``, unit stride along F; ``w_desc`` its ``[E*D, F]``
    descriptor, block ``[BLOCK_K, BLOCK_N]``, only when ``D % BLOCK_K == 0``), then the GLU
    backward on the tile. ``dy_g[r] = dy[row_to_assign[r] // TOP_K]``, or with DY_SORTED
    ``dy[r]`` (``dy`` expert-sorted ``[R, D]``; DY_TMA: through ``dy_desc``, block
    ``[BLOCK_M, BLOCK_K]``: a tile's rows of the next expert are loaded but never stored). A
    program covers ``N_ACC * BLOCK_N`` columns with N_ACC (1 or 2) accumulators that share each
    ``dy`` tile, and runs the epilogue per accumulator in EPI_SPLIT column chunks (fewer live
    registers). ``gw`` ``[R, cdiv(F, N_ACC * BLOCK_N)]`` fp32 gets each program's partial
    ``sum_f da * a``; grid as ``_up_glu_kernel``.
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(F, N_ACC * BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    expert, row0, row_end = _row_tile(ends_ptr, pid_m, R, E, BLOCK_M, BLOCK_E)
    if row0 >= row_end:
        return
    rows, in_rows, valid, asg, tok = _gathered_rows(r2a_ptr, row0, row_end, expert, E, TOP_K, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    n0 = pid_n * N_ACC * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    if DY_SORTED:
        dy_off = rows.to(tl.int64) * stride_dy
    else:
        dy_off = tok * stride_dy
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wd + cols[None, :]
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if N_ACC == 2:
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(expert < E, D, 0)
    for k0 in range(0, k_end, BLOCK_K):
        dy_ptrs = dy_ptr + dy_off[:, None] + (k0 + ks)[None, :]
        if EVEN_K:
            kmask = ks >= 0
        else:
            kmask = (k0 + ks) < D
        if DY_TMA:
            dya = dy_desc.load([row0, k0])
        elif EVEN_K:
            dya = tl.load(dy_ptrs, mask=valid[:, None], other=0.0)
        else:
            dya = tl.load(dy_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        if USE_TMA:
            wb = w_desc.load([expert * D + k0, n0])
        else:
            wb = tl.load(w_ptrs, mask=kmask[:, None] & (cols < F)[None, :], other=0.0)
        acc0 = _dot_acc(dya, wb, acc0)
        if N_ACC == 2:
            if USE_TMA:
                wb1 = w_desc.load([expert * D + k0, n0 + BLOCK_N])
            else:
                wb1 = tl.load(
                    w_ptrs + BLOCK_N, mask=kmask[:, None] & (cols + BLOCK_N < F)[None, :], other=0.0
                )
            acc1 = _dot_acc(dya, wb1, acc1)
        if not USE_TMA:
            w_ptrs += BLOCK_K * stride_wd

    if not GLU:  # plain gathered GEMM: dh_ptr is the [R, F] output
        _store_rows(dh_ptr, acc0, rows, in_rows, cols, F, F)
        if N_ACC == 2:
            _store_rows(dh_ptr, acc1, rows, in_rows, cols + BLOCK_N, F, F)
        return
    # Rows without an assignment have da = 0 (zero dy rows), w = 0 and g = u = 0 (h never read
    # there), so every output is 0 there.
    w = tl.load(tw_ptr + asg.to(tl.int64), mask=valid, other=0.0).to(tl.float32)[:, None]
    gw = _dgrad_tile_epilogue(
        acc0,
        rows,
        in_rows,
        valid,
        w,
        n0,
        h_ptr,
        dh_ptr,
        aw_ptr,
        F,
        stride_h,
        ACT,
        EPI_SPLIT,
        BLOCK_M,
        BLOCK_N,
    )
    if N_ACC == 2:
        gw += _dgrad_tile_epilogue(
            acc1,
            rows,
            in_rows,
            valid,
            w,
            n0 + BLOCK_N,
            h_ptr,
            dh_ptr,
            aw_ptr,
            F,
            stride_h,
            ACT,
            EPI_SPLIT,
            BLOCK_M,
            BLOCK_N,
        )
    tl.store(gw_ptr + rows.to(tl.int64) * tiles_n + pid_n, gw, mask=in_rows)


@triton.jit
def _store_rows(out_ptr, t, rows, in_rows, cols, width, stride):
    """``out[rows, cols] = t`` for rows in range and ``cols < width``."""
    row0 = tl.min(rows, axis=0)
    base = out_ptr + row0.to(tl.int64) * stride
    offs = (rows - row0)[:, None] * stride + cols[None, :]
    tl.store(base + offs, t.to(out_ptr.dtype.element_ty), mask=in_rows[:, None] & (cols < width)[None, :])


@triton.jit
def _dgrad_tile_epilogue(
    acc,
    rows,
    in_rows,
    valid,
    w,
    n0,
    h_ptr,
    dh_ptr,
    aw_ptr,
    F,
    stride_h,
    ACT: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The GLU backward of columns ``[n0, n0 + BLOCK_N)`` in EPI_SPLIT (1, 2, 4) chunks; returns
    the per-row ``sum_f da * a``."""
    if EPI_SPLIT == 1:
        c = n0 + tl.arange(0, BLOCK_N)
        g, u = _load_gu(h_ptr, rows, valid, c, F, stride_h)
        gw = _dgrad_epilogue(acc, g, u, rows, in_rows, w, c, dh_ptr, aw_ptr, F, ACT)
    elif EPI_SPLIT == 2:
        half: tl.constexpr = BLOCK_N // 2
        d0, d1 = _halves(acc, BLOCK_M, BLOCK_N)
        c = n0 + tl.arange(0, half)
        g, u = _load_gu(h_ptr, rows, valid, c, F, stride_h)
        gw = _dgrad_epilogue(d0, g, u, rows, in_rows, w, c, dh_ptr, aw_ptr, F, ACT)
        g, u = _load_gu(h_ptr, rows, valid, c + half, F, stride_h)
        gw += _dgrad_epilogue(d1, g, u, rows, in_rows, w, c + half, dh_ptr, aw_ptr, F, ACT)
    else:
        q: tl.constexpr = BLOCK_N // 4
        e0, e1 = _halves(acc, BLOCK_M, BLOCK_N)
        d0, d1 = _halves(e0, BLOCK_M, 2 * q)
        d2, d3 = _halves(e1, BLOCK_M, 2 * q)
        c = n0 + tl.arange(0, q)
        g, u = _load_gu(h_ptr, rows, valid, c, F, stride_h)
        gw = _dgrad_epilogue(d0, g, u, rows, in_rows, w, c, dh_ptr, aw_ptr, F, ACT)
        g, u = _load_gu(h_ptr, rows, valid, c + q, F, stride_h)
        gw += _dgrad_epilogue(d1, g, u, rows, in_rows, w, c + q, dh_ptr, aw_ptr, F, ACT)
        g, u = _load_gu(h_ptr, rows, valid, c + 2 * q, F, stride_h)
        gw += _dgrad_epilogue(d2, g, u, rows, in_rows, w, c + 2 * q, dh_ptr, aw_ptr, F, ACT)
        g, u = _load_gu(h_ptr, rows, valid, c + 3 * q, F, stride_h)
        gw += _dgrad_epilogue(d3, g, u, rows, in_rows, w, c + 3 * q, dh_ptr, aw_ptr, F, ACT)
    return gw


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """Columns ``[0, WIDTH/2)`` and ``[WIDTH/2, WIDTH)`` of ``t`` ``[BLOCK_M, WIDTH]``."""
    half: tl.constexpr = WIDTH // 2
    return tl.split(tl.permute(tl.reshape(t, [BLOCK_M, 2, half]), [0, 2, 1]))


@triton.jit
def _load_gu(h_ptr, rows, valid, cols, F, stride_h):
    """``h[rows, cols]`` and ``h[rows, F + cols]`` (raw dtype), zeros on invalid rows and cols >= F."""
    row0 = tl.min(rows, axis=0)
    base = h_ptr + row0.to(tl.int64) * stride_h
    offs = (rows - row0)[:, None] * stride_h + cols[None, :]
    mask = valid[:, None] & (cols < F)[None, :]
    return tl.load(base + offs, mask=mask, other=0.0), tl.load(base + F + offs, mask=mask, other=0.0)


@triton.jit
def _dgrad_epilogue(da, g, u, rows, in_rows, w, cols, dh_ptr, aw_ptr, F, ACT: tl.constexpr):
    """GLU backward of one column chunk (``g``, ``u``: the chunk of h): stores ``dh`` (both
    halves) and ``a * w``, returns the chunk's ``sum_f da * a`` per row. Addresses are 32-bit
    offsets from the tile's first row (fewer registers than 64-bit pointer tensors)."""
    g = g.to(tl.float32)
    u = u.to(tl.float32)
    act, dact = _act_and_grad(g, ACT)
    wda = w * da
    row0 = tl.min(rows, axis=0)
    rl = (rows - row0)[:, None]
    out_mask = in_rows[:, None] & (cols < F)[None, :]
    dh_base = dh_ptr + row0.to(tl.int64) * (2 * F)
    tl.store(
        dh_base + F + (rl * (2 * F) + cols[None, :]), (wda * act).to(dh_ptr.dtype.element_ty), mask=out_mask
    )
    a = act * u
    aw_base = aw_ptr + row0.to(tl.int64) * F
    tl.store(aw_base + (rl * F + cols[None, :]), (w * a).to(aw_ptr.dtype.element_ty), mask=out_mask)
    tl.store(
        dh_base + (rl * (2 * F) + cols[None, :]), (wda * u * dact).to(dh_ptr.dtype.element_ty), mask=out_mask
    )
    return tl.sum(da * a, axis=1)


@fast_launch
def _gathered_wgrad_kernel(
    a_ptr,
    b_ptr,
    a_desc,
    b_desc,
    r2a_ptr,
    ends_ptr,
    out_ptr,
    M,
    N,
    stride_a,
    stride_b,
    TOP_K,
    GATHER_A: tl.constexpr,
    SORTED_TMA: tl.constexpr,
    IDX64: tl.constexpr,
    EVEN_MN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[e] = A_e.T @ B_e`` (``out`` contiguous ``[E, M, N]``), one program per output tile,
    grid ``(E * cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``, an expert's tiles adjacent.

    Row ``r`` of the gathered operand (``A`` if GATHER_A, else ``B``) is row
    ``row_to_assign[r] // TOP_K`` of its source (zeros for ``-1``); the other operand is
    expert-sorted. IDX64: token offsets need 64 bits (else int32 address math); EVEN_MN: the
    tile divides ``M`` and ``N`` (no column masks). SORTED_TMA: whole ``BLOCK_K``-row chunks of
    the sorted operand come through its descriptor (``a_desc`` block ``[BLOCK_K, BLOCK_M]`` or
    ``b_desc`` block ``[BLOCK_K, BLOCK_N]``), the last partial chunk through masked loads. An
    empty expert writes zeros.
    """
    e, m0, n0, row_start, row_end = _weight_grad_tile(ends_ptr, M, N, BLOCK_M, BLOCK_N)
    ms = m0 + tl.arange(0, BLOCK_M)
    ns = n0 + tl.arange(0, BLOCK_N)
    mmask = ms < M
    nmask = ns < N
    rs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_full = 0
    if SORTED_TMA:
        num_full = tl.maximum(row_end - row_start, 0) // BLOCK_K
        for i in range(num_full):
            r = row_start + i * BLOCK_K
            asg = tl.load(r2a_ptr + r + rs)
            valid = asg >= 0
            tok = tl.where(valid, asg // TOP_K, 0)
            if IDX64:
                tok = tok.to(tl.int64)
            if GATHER_A:
                if EVEN_MN:
                    amask = valid[None, :]
                else:
                    amask = mmask[:, None] & valid[None, :]
                a_t = tl.load(a_ptr + (tok * stride_a)[None, :] + ms[:, None], mask=amask, other=0.0)
                b = b_desc.load([r, n0])
            else:
                if EVEN_MN:
                    bmask = valid[:, None]
                else:
                    bmask = valid[:, None] & nmask[None, :]
                a_t = a_desc.load([r, m0]).T
                b = tl.load(b_ptr + (tok * stride_b)[:, None] + ns[None, :], mask=bmask, other=0.0)
            acc = _dot_acc(a_t, b, acc)
    for r in range(row_start + num_full * BLOCK_K, row_end, BLOCK_K):
        rows = r + rs
        in_rows = rows < row_end
        rows64 = rows.to(tl.int64)
        asg = tl.load(r2a_ptr + rows, mask=in_rows, other=-1)
        valid = asg >= 0
        tok = tl.where(valid, asg // TOP_K, 0).to(tl.int64)
        if GATHER_A:
            a_t = tl.load(
                a_ptr + tok[None, :] * stride_a + ms[:, None], mask=mmask[:, None] & valid[None, :], other=0.0
            )
            b = tl.load(
                b_ptr + rows64[:, None] * stride_b + ns[None, :],
                mask=in_rows[:, None] & nmask[None, :],
                other=0.0,
            )
        else:
            a_t = tl.load(
                a_ptr + rows64[None, :] * stride_a + ms[:, None],
                mask=mmask[:, None] & in_rows[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + tok[:, None] * stride_b + ns[None, :], mask=valid[:, None] & nmask[None, :], other=0.0
            )
        acc = _dot_acc(a_t, b, acc)
    out_ptrs = out_ptr + e.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------

KINDS = ("up", "dgrad", "dgrad_sorted", "mm", "wgrad_a", "wgrad_b")
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _config(kind: str, dtype: torch.dtype, F: int = 0, interpret: bool = INTERPRET,
            large_smem: bool = True) -> dict:
    """Fixed launch configuration of kernel ``kind`` (``KINDS``) for operands of ``dtype``; ``F``:
    the up-projection's and GLU backward's F (tile shapes that won on an H100/H200 sweep,
    ``scripts/bench_gathered.py --sweep``); ``large_smem``: the GPU has Hopper's 227 KiB of
    shared memory per block (sm90+), not 99 KiB."""
    if interpret:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    elif kind == "up":  # BLOCK_K 32 was 11% faster at F=256, 2-5% slower at F=1408 and 1536
        bk, stages = (32, 5) if F <= 512 else (64, 3)
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, num_warps=8, num_stages=stages)
    elif kind == "dgrad":
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
    elif kind == "dgrad_sorted":  # capped registers: 1.06x / 1.14x the tile above at seed / mid
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, maxnreg=128)
    elif kind == "mm":  # BLOCK_N 256 won at the fine, mid and seed shapes (3-13%)
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    else:  # 7 stages (112 KiB) for the gathered x of the w_up gradient: 731 against 760 us at fine
        stages = 7 if kind == "wgrad_b" and large_smem else 5
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=stages)
    if kind.startswith("dgrad"):  # 4 chunks: 40 bytes of spills at 128x128 (ptxas, sm_90a), 2.9 KB in one
        cfg["EPI_SPLIT"] = 4
    if kind.startswith("dgrad") or kind == "mm":
        cfg["N_ACC"] = 1
    if kind.startswith("wgrad"):
        cfg["IDX64"] = False  # 64-bit token offsets even where 32 bits suffice (tests)
    return cfg


def _resolve_config(kind: str, dtype: torch.dtype, config: dict | None, F: int = 0,
                    device: torch.device | None = None) -> tuple[dict, bool]:
    """``(launch config, tma allowed)`` for operands on ``device``: ``config`` (benchmarks, tests)
    overrides keys of the fixed one; its key ``"tma"`` (default True) allows the TMA loads where
    they apply, ``"maxnreg"`` caps the registers per thread (a Triton launch option)."""
    small_smem = device is not None and device.type == "cuda" and _device_capability(device.index)[0] < 9
    cfg = _config(kind, dtype, F, large_smem=not small_smem)
    tma = True
    if config is not None:
        allowed = set(cfg) | set(_CONFIG_KEYS) | {"tma", "maxnreg"}
        unknown = set(config) - allowed
        if unknown:
            raise ValueError(
                f"config has unknown keys {sorted(unknown)} for {kind!r}; expected some of {sorted(allowed)}"
            )
        cfg.update({k: v for k, v in config.items() if k != "tma"})
        tma = bool(config.get("tma", True))
    return cfg, tma


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether 2-D views of ``tensors`` (last dim contiguous) can be TMA descriptors: 16-bit,
    16-byte aligned data and rows, on an sm90+ GPU (or any tensors under the interpreter)."""
    for t in tensors:
        if t.dtype not in (torch.bfloat16, torch.float16) or t.numel() == 0:
            return False
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]):
            return False
        if not INTERPRET and not (t.is_cuda and _device_capability(t.get_device())[0] >= 9):
            return False
    return True


def sorted_dgrad_glu_runs(dy: torch.Tensor) -> bool:
    """Whether ``sorted_dgrad_glu`` runs its kernel on ``dy`` (what ``gemm="fused_dgrad"`` needs
    to pay): 16-bit on an sm90+ GPU (TMA rows), or fp16/bf16/fp32 under the interpreter. Elsewhere
    the grouped GEMM and ``activation.glu_backward`` run instead."""
    if INTERPRET:
        return dy.dtype != torch.float64
    sixteen_bit = dy.dtype in (torch.float16, torch.bfloat16)
    return dy.is_cuda and sixteen_bit and _device_capability(dy.get_device())[0] >= 9


def _block_e(num_experts: int) -> int:
    return max(16, next_power_of_2(num_experts))


def _m_tiles(r_total: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of the schedule: each expert adds at most one partial tile,
    the tail one more."""
    return cdiv(r_total, block_m) + num_experts + 1


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_tensor(t, name: str, dim: int, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")


def _check_layout(src, row_to_assign, expert_ends, top_k, src_name: str) -> None:
    _check_tensor(row_to_assign, "row_to_assign", 1, (torch.int32,))
    _check_tensor(expert_ends, "expert_ends", 1, (torch.int32,))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    for t, name in ((row_to_assign, "row_to_assign"), (expert_ends, "expert_ends")):
        if t.device != src.device:
            raise ValueError(f"{name} is on {t.device}, expected {src_name}'s device {src.device}")
    if expert_ends.numel() == 0:
        raise ValueError("expert_ends must have one entry per expert, got 0 entries")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused(t: torch.Tensor) -> bool:
    return use_triton(t) and t.dtype != torch.float64


def _rows_past_end_zero(t: torch.Tensor, expert_ends: torch.Tensor) -> torch.Tensor:
    """``t`` with rows ``>= expert_ends[-1]`` set to zero (no host sync)."""
    idx = torch.arange(t.shape[0], device=t.device)
    return torch.where((idx < expert_ends[-1])[:, None], t, torch.zeros((), dtype=t.dtype, device=t.device))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def up_proj_glu(
    x: torch.Tensor,
    w_up: torch.Tensor,
    row_to_assign: torch.Tensor,
    expert_ends: torch.Tensor,
    top_k: int,
    activation_name: str,
    *,
    a_out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    save_h: bool = True,
    save_a: bool = True,
    config: dict | None = None,
):
    """Up-projection with the token gather in its prologue and the GLU in its epilogue.

    ``x`` ``[N, D]``; ``w_up`` ``[E, 2F, D]`` (gate rows first), same dtype; ``row_to_assign``
    ``[R]`` and ``expert_ends`` ``[E]`` int32 as in the module docstring; ``activation_name`` in
    ``activation.ACTIVATIONS``.

    With ``xg[r] = x[row_to_assign[r] // top_k]`` and ``e`` the expert of row ``r``:
    ``h[r] = xg[r] @ w_up[e].T`` (rounded to x's dtype) and ``a[r] = act(h[r, :F]) * h[r, F:]``.
    Rows with ``row_to_assign == -1`` or past ``expert_ends[-1]`` are exact zeros in both.

    Returns ``(a [R, F] or None, h [R, 2F] or None)`` of x's dtype: ``a`` when ``save_a``, ``h``
    when ``save_h`` (an output not asked for is never computed or written; ``save_a=False`` is
    the backward's recompute of ``h``). ``a_out`` / ``h_out``: contiguous destinations, returned
    when given.
    """
    code = _check_activation(activation_name)
    _check_tensor(x, "x", 2, _FLOATS)
    _check_tensor(w_up, "w_up", 3, (x.dtype,))
    _check_layout(x, row_to_assign, expert_ends, top_k, "x")
    E, two_f, D = w_up.shape
    if D != x.shape[1] or two_f % 2 or E != expert_ends.numel():
        raise ValueError(
            f"w_up must be [E, 2F, D] = [{expert_ends.numel()}, 2F, {x.shape[1]}], got {tuple(w_up.shape)}"
        )
    if w_up.device != x.device:
        raise ValueError(f"w_up is on {w_up.device}, expected x's device {x.device}")
    F = two_f // 2
    R = row_to_assign.numel()
    if not (save_a or save_h):
        raise ValueError("save_a and save_h are both False: nothing to compute")
    if a_out is not None:
        if not save_a:
            raise ValueError("a_out is given but save_a is False")
        check_out(a_out, (R, F), x.dtype, x.device, "a_out")
    if h_out is not None:
        if not save_h:
            raise ValueError("h_out is given but save_h is False")
        check_out(h_out, (R, two_f), x.dtype, x.device, "h_out")
    if not _fused(x) or R == 0 or F == 0 or x.shape[0] == 0 or D == 0:
        return _up_proj_glu_fallback(
            x, w_up, row_to_assign, expert_ends, top_k, activation_name, a_out, h_out, save_h, save_a
        )
    a = h = None
    if save_a:
        a = torch.empty(R, F, device=x.device, dtype=x.dtype) if a_out is None else a_out
    if save_h:
        h = torch.empty(R, two_f, device=x.device, dtype=x.dtype) if h_out is None else h_out
    if x.stride(1) != 1:
        x = x.contiguous()
    if w_up.stride(2) != 1:
        w_up = w_up.contiguous()
    cfg, tma = _resolve_config("up", x.dtype, config, F)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    use_tma = tma and w_up.is_contiguous() and _tma_ok(w_up)
    w_desc = TensorDescriptor(w_up.view(E * two_f, D), [E * two_f, D], [D, 1], [bn, bk]) if use_tma else None
    grid = (_m_tiles(R, E, bm) * cdiv(F, bn),)
    _up_glu_kernel[grid](
        x,
        w_up,
        w_desc if use_tma else w_up,
        row_to_assign,
        expert_ends,
        a if h is None else h,
        h if a is None else a,
        R,
        D,
        F,
        E,
        x.stride(0),
        w_up.stride(0),
        w_up.stride(1),
        TOP_K=top_k,
        ACT=code,
        SAVE_H=save_h,
        SAVE_A=save_a,
        USE_TMA=use_tma,
        EVEN_K=D % cfg["BLOCK_K"] == 0,
        BLOCK_E=_block_e(E),
        **cfg,
    )
    return a, h


def _up_proj_glu_fallback(x, w_up, row_to_assign, expert_ends, top_k, act, a_out, h_out, save_h, save_a):
    R, two_f = row_to_assign.numel(), w_up.shape[1]
    if R == 0 or x.shape[0] == 0 or x.shape[1] == 0:
        h = torch.zeros(R, two_f, device=x.device, dtype=x.dtype)
    else:
        xg = permute.gather_rows(x, row_to_assign, top_k)
        h = _rows_past_end_zero(grouped_gemm.grouped_mm(xg, w_up, expert_ends, True), expert_ends)
    a = activation.glu_forward(h, act) if save_a else None
    if a_out is not None:
        a = a_out.copy_(a)
    if not save_h:
        return a, None
    return a, (h if h_out is None else h_out.copy_(h))


def gathered_dgrad_glu(
    grad_out: torch.Tensor,
    w_down: torch.Tensor,
    h: torch.Tensor,
    row_to_assign: torch.Tensor,
    expert_ends: torch.Tensor,
    topk_weights: torch.Tensor,
    top_k: int,
    activation_name: str,
    *,
    dh_out: torch.Tensor | None = None,
    a_weighted_out: torch.Tensor | None = None,
    grad_w_row_out: torch.Tensor | None = None,
    config: dict | None = None,
):
    """Input gradient of the down-projection with the token gather in its prologue and the
    routing-weighted GLU backward in its epilogue.

    ``grad_out`` ``[N, D]``; ``w_down`` ``[E, D, F]``; ``h`` ``[R, 2F]`` (the up-projection's
    output), all one dtype; ``topk_weights`` ``[N, K]`` (fp32, fp64 for fp64 inputs).

    With ``dyg[r] = grad_out[row_to_assign[r] // top_k]``, ``da[r] = dyg[r] @ w_down[e]`` (fp32,
    never rounded), ``w_r = topk_weights.flatten()[row_to_assign[r]]``, ``g, u = h[r, :F], h[r, F:]``:
    returns ``dh = [w_r * da * u * act'(g), w_r * da * act(g)]`` ``[R, 2F]`` and
    ``a_weighted = w_r * act(g) * u`` ``[R, F]`` (both h's dtype) and ``grad_w_row = sum_f da * act(g) * u``
    ``[R]`` (fp32, fp64 for fp64) - the semantics of ``activation.glu_backward`` with ``da`` computed
    here. Rows with ``row_to_assign == -1`` or past ``expert_ends[-1]`` get exact zeros whatever
    ``h`` holds there. Deterministic: ``grad_w_row`` sums per-tile partials in a fixed order.
    """
    return _dgrad_glu(grad_out, False, w_down, h, row_to_assign, expert_ends, topk_weights, top_k,
                      activation_name, dh_out, a_weighted_out, grad_w_row_out, config)


def sorted_dgrad_glu(
    dy: torch.Tensor,
    w_down: torch.Tensor,
    h: torch.Tensor,
    row_to_assign: torch.Tensor,
    expert_ends: torch.Tensor,
    topk_weights: torch.Tensor,
    top_k: int,
    activation_name: str,
    *,
    dh_out: torch.Tensor | None = None,
    a_weighted_out: torch.Tensor | None = None,
    grad_w_row_out: torch.Tensor | None = None,
    config: dict | None = None,
):
    """``gathered_dgrad_glu`` on an output gradient already laid out in expert order: ``dy``
    ``[R, D]`` (``permute.scatter_rows``/``gather_rows`` of ``grad_out``; rows without an
    assignment finite), ``da[r] = dy[r] @ w_down[e]``; the rest as there. On sm90+ the ``dy`` rows
    come through a TMA descriptor as the weights do."""
    return _dgrad_glu(dy, True, w_down, h, row_to_assign, expert_ends, topk_weights, top_k,
                      activation_name, dh_out, a_weighted_out, grad_w_row_out, config)


def _dgrad_glu(src, src_sorted, w_down, h, row_to_assign, expert_ends, topk_weights, top_k, activation_name,
               dh_out, a_weighted_out, grad_w_row_out, config):
    src_name = "dy" if src_sorted else "grad_out"
    code = _check_activation(activation_name)
    _check_tensor(src, src_name, 2, _FLOATS)
    _check_tensor(w_down, "w_down", 3, (src.dtype,))
    _check_tensor(h, "h", 2, (src.dtype,))
    _check_layout(src, row_to_assign, expert_ends, top_k, src_name)
    E, D, F = w_down.shape
    R = row_to_assign.numel()
    if D != src.shape[1] or E != expert_ends.numel():
        raise ValueError(
            f"w_down must be [E, D, F] = [{expert_ends.numel()}, {src.shape[1]}, F], "
            f"got {tuple(w_down.shape)}"
        )
    if src_sorted and src.shape[0] != R:
        raise ValueError(f"dy (expert-sorted) must have R = {R} rows, got {src.shape[0]}")
    if tuple(h.shape) != (R, 2 * F):
        raise ValueError(f"h must be [R, 2F] = [{R}, {2 * F}], got {tuple(h.shape)}")
    N = topk_weights.shape[0] if src_sorted and isinstance(topk_weights, torch.Tensor) else src.shape[0]
    if not isinstance(topk_weights, torch.Tensor) or tuple(topk_weights.shape) != (N, top_k):
        raise ValueError(
            f"topk_weights must be [N, K] = [{N}, {top_k}], got "
            f"{getattr(topk_weights, 'shape', type(topk_weights).__name__)}"
        )
    for t, name in ((w_down, "w_down"), (h, "h"), (topk_weights, "topk_weights")):
        if t.device != src.device:
            raise ValueError(f"{name} is on {t.device}, expected {src_name}'s device {src.device}")
    dtype = src.dtype
    dev = src.device
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    if dh_out is not None:
        check_out(dh_out, (R, 2 * F), dtype, dev, "dh_out")
    if a_weighted_out is not None:
        check_out(a_weighted_out, (R, F), dtype, dev, "a_weighted_out")
    if grad_w_row_out is not None:
        check_out(grad_w_row_out, (R,), cdt, dev, "grad_w_row_out")
    if not _fused(src) or R == 0 or F == 0 or N == 0 or D == 0:
        if R == 0 or N == 0 or D == 0:
            da = torch.zeros(R, F, device=dev, dtype=dtype)
        else:
            rows = src if src_sorted else permute.gather_rows(src, row_to_assign, top_k)
            da = _rows_past_end_zero(grouped_gemm.grouped_mm(rows, w_down, expert_ends, False), expert_ends)
        results = activation.glu_backward(h, da, activation_name, row_to_assign, topk_weights)
        outs = (dh_out, a_weighted_out, grad_w_row_out)
        return tuple(r if o is None else o.copy_(r) for r, o in zip(results, outs, strict=True))
    dh = torch.empty(R, 2 * F, device=dev, dtype=dtype) if dh_out is None else dh_out
    aw = torch.empty(R, F, device=dev, dtype=dtype) if a_weighted_out is None else a_weighted_out
    gw = torch.empty(R, device=dev, dtype=cdt) if grad_w_row_out is None else grad_w_row_out
    if src.stride(1) != 1:
        src = src.contiguous()
    if w_down.stride(2) != 1:
        w_down = w_down.contiguous()
    if h.stride(1) != 1:
        h = h.contiguous()
    weights = topk_weights.reshape(-1).to(cdt).contiguous()
    cfg, tma = _resolve_config("dgrad_sorted" if src_sorted else "dgrad", dtype, config, F)
    tiles_n = cdiv(F, cfg["N_ACC"] * cfg["BLOCK_N"])
    partial = gw if tiles_n == 1 else torch.empty(R, tiles_n, device=dev, dtype=torch.float32)
    _launch_gathered_nn(src, w_down, row_to_assign, expert_ends, top_k, dh, cfg, tma,
                        glu=(h, weights, aw, partial, code), src_sorted=src_sorted)
    if tiles_n > 1:
        torch.sum(partial, dim=1, out=gw)
    return dh, aw, gw


def _launch_gathered_nn(src, w, row_to_assign, expert_ends, top_k, out, cfg, tma, glu=None, src_sorted=False):
    """``out[r] = src[row_to_assign[r] // top_k] @ w[e]`` (``w`` ``[E, D, F]``; ``src_sorted``:
    ``src[r]``, src ``[R, D]``) through ``_dgrad_glu_kernel``; with ``glu = (h, weights,
    a_weighted, partial, act_code)`` ``out`` is ``dh`` and the GLU backward runs in the epilogue."""
    E, D, F = w.shape
    R = row_to_assign.numel()
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    use_tma = tma and w.is_contiguous() and D % bk == 0 and _tma_ok(w)
    w_desc = TensorDescriptor(w.view(E * D, F), [E * D, F], [F, 1], [bk, bn]) if use_tma else w
    dy_tma = src_sorted and tma and _tma_ok(src)
    dy_desc = TensorDescriptor(src, [R, D], [src.stride(0), 1], [bm, bk]) if dy_tma else src
    h, weights, aw, partial, code = glu if glu is not None else (out, out, out, out, 0)
    if glu is None:
        cfg = dict(cfg, EPI_SPLIT=1)
    grid = (_m_tiles(R, E, bm) * cdiv(F, cfg["N_ACC"] * bn),)
    _dgrad_glu_kernel[grid](
        src,
        dy_desc,
        w,
        w_desc,
        h,
        row_to_assign,
        expert_ends,
        weights,
        out,
        aw,
        partial,
        R,
        D,
        F,
        E,
        src.stride(0),
        w.stride(0),
        w.stride(1),
        h.stride(0),
        TOP_K=top_k,
        ACT=code,
        GLU=glu is not None,
        USE_TMA=use_tma,
        DY_SORTED=src_sorted,
        DY_TMA=dy_tma,
        EVEN_K=D % cfg["BLOCK_K"] == 0,
        BLOCK_E=_block_e(E),
        **cfg,
    )


def gathered_mm(
    src: torch.Tensor,
    w: torch.Tensor,
    row_to_assign: torch.Tensor,
    expert_ends: torch.Tensor,
    top_k: int,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Grouped GEMM with the token gather in its prologue and no epilogue work.

    ``src`` ``[N, D]``, ``w`` ``[E, D, F]`` (e.g. ``grad_out`` and ``w_down``: the unfused
    ``da``). Returns ``out [R, F]`` (src's dtype, fp32 accumulation) with
    ``out[r] = src[row_to_assign[r] // top_k] @ w[e]``; rows with ``row_to_assign == -1`` or past
    ``expert_ends[-1]`` are exact zeros. ``out``: a contiguous destination, returned when given.
    """
    _check_tensor(src, "src", 2, _FLOATS)
    _check_tensor(w, "w", 3, (src.dtype,))
    _check_layout(src, row_to_assign, expert_ends, top_k, "src")
    E, D, F = w.shape
    if D != src.shape[1] or E != expert_ends.numel():
        raise ValueError(
            f"w must be [E, D, F] = [{expert_ends.numel()}, {src.shape[1]}, F], got {tuple(w.shape)}"
        )
    if w.device != src.device:
        raise ValueError(f"w is on {w.device}, expected src's device {src.device}")
    R = row_to_assign.numel()
    if out is not None:
        check_out(out, (R, F), src.dtype, src.device, "out")
    if not _fused(src) or R == 0 or F == 0 or src.shape[0] == 0 or D == 0:
        if R == 0 or src.shape[0] == 0 or D == 0:
            result = torch.zeros(R, F, device=src.device, dtype=src.dtype)
        else:
            g = permute.gather_rows(src, row_to_assign, top_k)
            result = _rows_past_end_zero(grouped_gemm.grouped_mm(g, w, expert_ends, False), expert_ends)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(R, F, device=src.device, dtype=src.dtype)
    if src.stride(1) != 1:
        src = src.contiguous()
    if w.stride(2) != 1:
        w = w.contiguous()
    cfg, tma = _resolve_config("mm", src.dtype, config, F)
    _launch_gathered_nn(src, w, row_to_assign, expert_ends, top_k, out, cfg, tma)
    return out


def gathered_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    row_to_assign: torch.Tensor,
    expert_ends: torch.Tensor,
    top_k: int,
    gather: str,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Per-expert ``out[e] = A_e.T @ B_e`` with one operand gathered by token.

    ``gather="a"``: ``a`` is ``[N, M]`` token rows, ``A[r] = a[row_to_assign[r] // top_k]``, and
    ``b`` ``[R, Nout]`` expert-sorted (``grad_w_down = gathered_weight_grad(grad_out, a_weighted,
    ..., "a")`` ``[E, D, F]``). ``gather="b"``: ``a`` ``[R, M]`` sorted, ``b`` ``[N, Nout]`` token
    rows (``grad_w_up = gathered_weight_grad(dh, x, ..., "b")`` ``[E, 2F, D]``). Gathered rows of
    ``row_to_assign == -1`` are zeros (so the sorted operand's rows there must be finite, as
    ``gathered_dgrad_glu``'s zeros are); sorted rows past ``expert_ends[-1]`` are never read.

    Returns ``out`` ``[E, M, Nout]`` of the operands' dtype (exact zeros for an expert with no rows),
    written into ``out`` when given (contiguous; the operands' dtype or float32).
    """
    if gather not in ("a", "b"):
        raise ValueError(f"gather must be 'a' or 'b', got {gather!r}")
    _check_tensor(a, "a", 2, _FLOATS)
    _check_tensor(b, "b", 2, (a.dtype,))
    _check_layout(a, row_to_assign, expert_ends, top_k, "a")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device}, expected a's device {a.device}")
    R = row_to_assign.numel()
    sorted_t, sorted_name = (b, "b") if gather == "a" else (a, "a")
    if sorted_t.shape[0] != R:
        raise ValueError(f"{sorted_name} (expert-sorted) must have R = {R} rows, got {sorted_t.shape[0]}")
    E = expert_ends.numel()
    M, N = a.shape[1], b.shape[1]
    if out is not None:
        check_out(out, (E, M, N), a.dtype, a.device, "out", float32_ok=True)
    n_tok = (a if gather == "a" else b).shape[0]
    if not _fused(a) or R == 0 or n_tok == 0 or M == 0 or N == 0:
        if R == 0 or n_tok == 0:
            result = torch.zeros(E, M, N, device=a.device, dtype=a.dtype)
            return result if out is None else out.copy_(result)
        if gather == "a":
            lhs, rhs = permute.gather_rows(a, row_to_assign, top_k), b
        else:
            lhs, rhs = a, permute.gather_rows(b, row_to_assign, top_k)
        return grouped_gemm.grouped_mm_weight_grad(lhs, rhs, expert_ends, out=out)
    if out is None:
        out = torch.empty(E, M, N, device=a.device, dtype=a.dtype)
    if a.stride(1) != 1:
        a = a.contiguous()
    if b.stride(1) != 1:
        b = b.contiguous()
    sorted_t, gathered = (b, a) if gather == "a" else (a, b)
    cfg, tma = _resolve_config(f"wgrad_{gather}", a.dtype, config, device=a.device)
    idx64 = cfg.pop("IDX64") or gathered.shape[0] * gathered.stride(0) >= 2**31
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    use_tma = tma and _tma_ok(sorted_t)
    a_desc = b_desc = sorted_t
    if use_tma and gather == "a":
        b_desc = TensorDescriptor(b, [R, N], [b.stride(0), 1], [bk, bn])
    elif use_tma:
        a_desc = TensorDescriptor(a, [R, M], [a.stride(0), 1], [bk, bm])
    grid = (E * cdiv(M, bm) * cdiv(N, bn),)
    _gathered_wgrad_kernel[grid](
        a,
        b,
        a_desc,
        b_desc,
        row_to_assign,
        expert_ends,
        out,
        M,
        N,
        a.stride(0),
        b.stride(0),
        TOP_K=top_k,
        GATHER_A=gather == "a",
        SORTED_TMA=use_tma,
        IDX64=idx64,
        EVEN_MN=M % bm == 0 and N % bn == 0,
        **cfg,
    )
    return out
