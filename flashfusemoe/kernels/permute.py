"""Expert-sorted row layout: routing maps, row gather and weighted combine.

Names follow ``docs/design.md``: ``A = N*K`` assignments ``a = n*K + k``, ``R`` rows of the
expert-sorted layout (``R = A`` dropless, ``R = E*M`` padded).
"""

from typing import NamedTuple

import torch
import triton.language as tl

from flashfusemoe.kernels import (
    INTERP,
    cdiv,
    check_out,
    deliver,
    next_power_of_2,
    out_buffer,
    row_blocks,
    use_triton,
)
from flashfusemoe.kernels.launch import fast_launch

_LAYOUT_BLOCK = 2048
_GATHER_ELEMS = 4096  # elements per gather program
_COMBINE_ELEMS = 4096  # output elements per combine program
_SCATTER_ELEMS = 4096  # source elements per scatter program
_LAYOUT_PROGRAMS = 128  # layout_and_gather programs; each reads the whole block_counts table


class Layout(NamedTuple):
    """The expert-sorted row layout's maps, all int32 (as results, or as optional destinations)."""

    assign_to_row: torch.Tensor | None = None  # [A] row of each assignment, -1 if it has none
    row_to_assign: torch.Tensor | None = None  # [R] assignment of each row, -1 for an empty row
    expert_ends: torch.Tensor | None = None  # [E] cumulative end row of each expert
    tokens_per_expert: torch.Tensor | None = None  # [E] assignments per expert, placed or not
    num_unplaced: torch.Tensor | None = None  # [1] assignments with no row


@fast_launch
def _expert_layout_kernel(
    ids_ptr,
    keep_ptr,
    assign_to_row_ptr,
    row_to_assign_ptr,
    expert_ends_ptr,
    tokens_per_expert_ptr,
    num_unplaced_ptr,
    A,
    E,
    M,
    HAS_KEEP: tl.constexpr,
    PADDED: tl.constexpr,
    E_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program e owns expert e: its counts, its assignments' entries of assign_to_row and its
    # rows of row_to_assign. The last program also owns the unused tail rows (dropless) and
    # num_unplaced. Every output element is written by exactly one program.
    e = tl.program_id(0)
    offs0 = tl.arange(0, BLOCK)

    # Pass 1: kept assignments of experts < e (our start row), kept and all of expert e.
    n_before = tl.zeros([BLOCK], tl.int32)
    n_kept = tl.zeros([BLOCK], tl.int32)
    n_all = tl.zeros([BLOCK], tl.int32)
    for start in range(0, A, BLOCK):
        offs = start + offs0
        inb = offs < A
        ids = tl.load(ids_ptr + offs, mask=inb, other=-1)
        kept = inb
        if HAS_KEEP:
            kept = kept & (tl.load(keep_ptr + offs, mask=inb, other=0) != 0)
        n_before += (kept & (ids < e)).to(tl.int32)
        n_kept += (kept & (ids == e)).to(tl.int32)
        n_all += (ids == e).to(tl.int32)
    count = tl.sum(n_kept, axis=0)
    tl.store(tokens_per_expert_ptr + e, tl.sum(n_all, axis=0))
    if PADDED:
        base = e * M
        n_placed = tl.minimum(count, M)
    else:
        base = tl.sum(n_before, axis=0)
        n_placed = count
    tl.store(expert_ends_ptr + e, base + n_placed)

    # Pass 2: rank expert e's kept assignments in assignment order and place them.
    rank0 = tl.zeros([], tl.int32)
    for start in range(0, A, BLOCK):
        offs = start + offs0
        inb = offs < A
        ids = tl.load(ids_ptr + offs, mask=inb, other=-1)
        mine = ids == e
        sel = mine
        if HAS_KEEP:
            sel = sel & (tl.load(keep_ptr + offs, mask=inb, other=0) != 0)
        sel_i = sel.to(tl.int32)
        rank = rank0 + tl.cumsum(sel_i, axis=0) - sel_i
        placed = sel
        if PADDED:
            placed = sel & (rank < M)
        row = base + rank
        tl.store(assign_to_row_ptr + offs, tl.where(placed, row, -1), mask=mine)
        tl.store(row_to_assign_ptr + row, offs, mask=placed)
        rank0 += tl.sum(sel_i, axis=0)

    neg = tl.full([BLOCK], -1, tl.int32)
    if PADDED:
        for start in range(0, M, BLOCK):
            r = start + offs0
            tl.store(row_to_assign_ptr + base + r, neg, mask=(r >= n_placed) & (r < M))
    if e == E - 1:
        if PADDED:
            # Placed total = sum_e min(kept_e, M): needs every expert's count.
            hist = tl.zeros([E_BLOCK], tl.int32)
            for start in range(0, A, BLOCK):
                offs = start + offs0
                inb = offs < A
                ids = tl.load(ids_ptr + offs, mask=inb, other=0)
                kept = inb
                if HAS_KEEP:
                    kept = kept & (tl.load(keep_ptr + offs, mask=inb, other=0) != 0)
                hist += tl.histogram(ids, E_BLOCK, mask=kept)
            total_placed = tl.sum(tl.minimum(hist, M), axis=0)
        else:
            total_placed = base + n_placed
            for start in range(0, A, BLOCK):
                r = start + offs0
                tl.store(row_to_assign_ptr + r, neg, mask=(r >= total_placed) & (r < A))
        tl.store(num_unplaced_ptr, A - total_placed)


def expert_layout(
    topk_ids: torch.Tensor,
    num_experts: int,
    rows_per_expert: int = 0,
    keep: torch.Tensor | None = None,
) -> Layout:
    """Expert-sorted row layout of the assignments.

    ``topk_ids`` ``[N, K]`` int32, ``keep`` ``[A]`` bool or None (all kept).
    ``rows_per_expert == 0``: dropless, ``R = A``; ``M > 0``: padded, ``R = E*M``.

    Returns the ``Layout``: ``tokens_per_expert`` counts all assignments, kept or not.
    """
    n, k = topk_ids.shape
    a_total = n * k
    e_total = num_experts
    m = rows_per_expert
    padded = m > 0
    r_total = e_total * m if padded else a_total
    dev = topk_ids.device
    i32 = torch.int32
    if a_total == 0:
        ends = (
            torch.arange(e_total, device=dev, dtype=i32) * m
            if padded
            else torch.zeros(e_total, device=dev, dtype=i32)
        )
        return Layout(
            torch.empty(0, device=dev, dtype=i32),
            torch.full((r_total,), -1, device=dev, dtype=i32),
            ends,
            torch.zeros(e_total, device=dev, dtype=i32),
            torch.zeros(1, device=dev, dtype=i32),
        )
    ids = topk_ids.reshape(-1).to(i32).contiguous()
    if not use_triton(topk_ids):
        return _expert_layout_torch(ids, e_total, m, keep)

    assign_to_row = torch.empty(a_total, device=dev, dtype=i32)
    row_to_assign = torch.empty(r_total, device=dev, dtype=i32)
    expert_ends = torch.empty(e_total, device=dev, dtype=i32)
    tokens_per_expert = torch.empty(e_total, device=dev, dtype=i32)
    num_unplaced = torch.empty(1, device=dev, dtype=i32)
    keep_arg = ids if keep is None else keep.reshape(-1).contiguous().view(torch.uint8)
    _expert_layout_kernel[(e_total,)](
        ids,
        keep_arg,
        assign_to_row,
        row_to_assign,
        expert_ends,
        tokens_per_expert,
        num_unplaced,
        a_total,
        e_total,
        m,
        HAS_KEEP=keep is not None,
        PADDED=padded,
        E_BLOCK=next_power_of_2(e_total),
        BLOCK=_LAYOUT_BLOCK,
        num_warps=4,
    )
    return Layout(assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced)


def _expert_layout_torch(ids, e_total, m, keep):
    dev = ids.device
    a_total = ids.numel()
    ids64 = ids.long()
    kept = torch.ones(a_total, device=dev, dtype=torch.bool) if keep is None else keep.reshape(-1).bool()
    ones = torch.ones(a_total, device=dev, dtype=torch.int64)
    all_counts = torch.zeros(e_total, device=dev, dtype=torch.int64).scatter_add_(0, ids64, ones)
    kept_counts = torch.zeros(e_total, device=dev, dtype=torch.int64).scatter_add_(0, ids64, kept.long())
    # Rank among the kept assignments of the same expert, in assignment order.
    key = torch.where(kept, ids64, e_total)
    order = torch.argsort(key, stable=True)
    starts = torch.cumsum(kept_counts, 0) - kept_counts
    starts_ext = torch.cat([starts, kept_counts.sum().reshape(1)])
    rank_sorted = torch.arange(a_total, device=dev) - starts_ext[key[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    if m > 0:
        placed = kept & (rank < m)
        row = ids64 * m + rank
        r_total = e_total * m
        expert_ends = torch.arange(e_total, device=dev) * m + kept_counts.clamp(max=m)
    else:
        placed = kept
        row = starts[ids64] + rank
        r_total = a_total
        expert_ends = torch.cumsum(kept_counts, 0)
    assign_to_row = torch.where(placed, row, -1)
    # Unplaced assignments scatter into a spare slot r_total, dropped afterwards.
    row_to_assign = torch.full((r_total + 1,), -1, device=dev, dtype=torch.int64)
    row_to_assign.scatter_(0, torch.where(placed, row, r_total), torch.arange(a_total, device=dev))
    row_to_assign = row_to_assign[:r_total]
    num_unplaced = (a_total - placed.sum()).reshape(1)
    i32 = torch.int32
    return Layout(
        assign_to_row.to(i32),
        row_to_assign.to(i32),
        expert_ends.to(i32),
        all_counts.to(i32),
        num_unplaced.to(i32),
    )


@fast_launch
def _layout_gather_kernel(
    x_ptr,
    ids_ptr,
    block_counts_ptr,
    x_sorted_ptr,
    assign_to_row_ptr,
    row_to_assign_ptr,
    expert_ends_ptr,
    tokens_per_expert_ptr,
    num_unplaced_ptr,
    N,
    D,
    E,
    NUM_BLOCKS,
    stride_x,
    K: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TABLE_ROWS: tl.constexpr,
):
    # Dropless layout and row gather in one pass. block_counts[b, e] (written by the routing
    # kernel) counts assignments of token block b to expert e. Program p owns token blocks
    # [p*BPP, (p+1)*BPP): expert e's rows start at sum(totals[<e]); within the expert, its
    # blocks' assignments follow the assignments of all earlier blocks, in token order.
    pid = tl.program_id(0)
    e_offs = tl.arange(0, BLOCK_E)
    emask = e_offs < E
    first_block = pid * BLOCKS_PER_PROGRAM
    totals = tl.zeros([BLOCK_E], tl.int32)
    before = tl.zeros([BLOCK_E], tl.int32)
    for t0 in range(0, NUM_BLOCKS, TABLE_ROWS):
        trow = t0 + tl.arange(0, TABLE_ROWS)
        tile = tl.load(block_counts_ptr + trow[:, None] * E + e_offs[None, :],
                       mask=(trow < NUM_BLOCKS)[:, None] & emask[None, :], other=0)
        totals += tl.sum(tile, axis=0)
        before += tl.sum(tl.where((trow < first_block)[:, None], tile, 0), axis=0)
    ends = tl.cumsum(totals, axis=0)
    base = ends - totals + before  # next free row of each expert
    if pid == 0:
        tl.store(expert_ends_ptr + e_offs, ends, mask=emask)
        tl.store(tokens_per_expert_ptr + e_offs, totals, mask=emask)
        tl.store(num_unplaced_ptr, 0)

    k_offs = tl.arange(0, BLOCK_K)
    kmask = k_offs < K
    for blk in range(BLOCKS_PER_PROGRAM):
        tok = (first_block + blk) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = tok < N
        t64 = tok.to(tl.int64)
        ids = tl.load(ids_ptr + t64[:, None] * K + k_offs[None, :], mask=nmask[:, None] & kmask[None, :],
                      other=-1)  # [BLOCK_N, BLOCK_K]
        # hits[n, e] = 1 if token n picked expert e (at most once: top-k experts are distinct).
        hits = tl.zeros([BLOCK_N, BLOCK_E], tl.int32)
        for k in tl.static_range(K):
            ids_k = tl.sum(tl.where(k_offs[None, :] == k, ids, 0), axis=1)
            ids_k = tl.where(nmask, ids_k, -1)
            hits += (ids_k[:, None] == e_offs[None, :]).to(tl.int32)
        row_of = base[None, :] + tl.cumsum(hits, axis=0) - hits  # [BLOCK_N, BLOCK_E]
        rows = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        for k in tl.static_range(K):
            ids_k = tl.sum(tl.where(k_offs[None, :] == k, ids, 0), axis=1)
            row_k = tl.sum(tl.where(ids_k[:, None] == e_offs[None, :], row_of, 0), axis=1)
            rows = tl.where(k_offs[None, :] == k, row_k[:, None], rows)
        base += tl.sum(hits, axis=0)
        amask = nmask[:, None] & kmask[None, :]
        asg = t64[:, None] * K + k_offs[None, :]
        tl.store(assign_to_row_ptr + asg, rows, mask=amask)
        tl.store(row_to_assign_ptr + rows, asg.to(tl.int32), mask=amask)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            xmask = nmask[:, None] & (cols < D)[None, :]
            xt = tl.load(x_ptr + t64[:, None] * stride_x + cols[None, :], mask=xmask)
            for k in tl.static_range(K):  # each token row goes to its K expert rows
                dst = tl.sum(tl.where(k_offs[None, :] == k, rows, 0), axis=1).to(tl.int64)
                tl.store(x_sorted_ptr + dst[:, None] * D + cols[None, :], xt, mask=xmask)


def layout_gather_blocks(num_tokens: int, top_k: int, num_experts: int) -> int:
    """A token-block size for ``layout_and_gather``'s ``block_counts`` table when no routing kernel
    made one (``core.experts_forward``)."""
    block_e = next_power_of_2(max(num_experts, 1))
    return max(16, min(64, 8192 // (block_e * next_power_of_2(top_k))))


def layout_and_gather(x, topk_ids, num_experts: int, block_counts, block_n: int,
                      out: Layout | None = None) -> tuple[torch.Tensor, ...]:
    """Dropless layout fused with the row gather (the default forward path, one launch).

    ``x`` ``[N, D]``, ``topk_ids`` ``[N, K]`` int32, ``block_counts`` ``[cdiv(N, block_n), E]``
    int32 (assignments of each token block per expert, from ``routing.route_forward``) or None.
    Returns ``x_sorted [A, D]`` and the five maps of ``expert_layout(topk_ids, E)``, each in its
    ``out`` buffer where given.
    """
    n, k = topk_ids.shape
    out = Layout() if out is None else out
    if block_counts is None or not use_triton(x) or n == 0:
        layout = expert_layout(topk_ids, num_experts)
        layout = Layout(*(deliver(t, o, f"out.{name}") for t, o, name in zip(layout, out, Layout._fields,
                                                                              strict=True)))
        return gather_rows(x, layout.row_to_assign, k), *layout
    d = x.shape[1]
    dev, i32 = x.device, torch.int32
    num_blocks = block_counts.shape[0]
    blocks_per_program = max(1, num_blocks // _LAYOUT_PROGRAMS)
    x_sorted = torch.empty(n * k, d, device=dev, dtype=x.dtype)
    shapes = {"assign_to_row": (n * k,), "row_to_assign": (n * k,), "expert_ends": (num_experts,),
              "tokens_per_expert": (num_experts,), "num_unplaced": (1,)}
    layout = Layout(*(out_buffer(getattr(out, name), shapes[name], i32, dev, f"out.{name}")
                      for name in Layout._fields))
    block_k = next_power_of_2(k)
    block_d = max(16, min(256, next_power_of_2(d), 8192 // block_n))
    _layout_gather_kernel[(cdiv(num_blocks, blocks_per_program),)](
        x, topk_ids, block_counts, x_sorted, *layout, n, d, num_experts, num_blocks, x.stride(0), K=k,
        BLOCKS_PER_PROGRAM=blocks_per_program, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_E=next_power_of_2(num_experts), BLOCK_D=block_d, TABLE_ROWS=64,
    )
    return x_sorted, *layout


@fast_launch
def _capacity_drop_kernel(
    weights_ptr,
    assign_to_row_ptr,
    row_to_assign_ptr,
    expert_ends_ptr,
    x_sorted_ptr,
    dropped_ptr,
    D,
    E,
    capacity,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Program e keeps the `capacity` highest-weight rows of expert e (ties: lower row, i.e.
    # token order) and drops the rest in place. The capacity-th largest weight is found by
    # bisection on the bit patterns of the (non-negative) weights, which order like the values.
    e = tl.program_id(0)
    if FP64:
        bits_ty = tl.int64
        n_iter = 64
        hi0 = 0x7FF0000000000001
    else:
        bits_ty = tl.int32
        n_iter = 32
        hi0 = 0x7F800001
    if e == 0:
        ev = tl.arange(0, BLOCK_E)
        ends = tl.load(expert_ends_ptr + ev, mask=ev < E, other=0)
        prev = tl.load(expert_ends_ptr + ev - 1, mask=(ev > 0) & (ev < E), other=0)
        tl.store(dropped_ptr, tl.sum(tl.maximum(ends - prev - capacity, 0), axis=0))
    end = tl.load(expert_ends_ptr + e)
    start = tl.load(expert_ends_ptr + e - 1, mask=e > 0, other=0)
    if end - start > capacity:
        lo = tl.zeros([], bits_ty)
        hi = tl.full([], hi0, bits_ty)
        for _ in range(n_iter):
            mid = lo + (hi - lo) // 2
            n_ge = tl.zeros([], tl.int32)
            for r0 in range(start, end, BLOCK):
                r = r0 + tl.arange(0, BLOCK)
                m = r < end
                a = tl.load(row_to_assign_ptr + r, mask=m, other=0)
                bits = tl.load(weights_ptr + a, mask=m, other=0.0).to(bits_ty, bitcast=True)
                n_ge += tl.sum((m & (bits >= mid)).to(tl.int32), axis=0)
            lo = tl.where(n_ge >= capacity, mid, lo)
            hi = tl.where(n_ge >= capacity, hi, mid)
        n_gt = tl.zeros([], tl.int32)
        for r0 in range(start, end, BLOCK):
            r = r0 + tl.arange(0, BLOCK)
            m = r < end
            a = tl.load(row_to_assign_ptr + r, mask=m, other=0)
            bits = tl.load(weights_ptr + a, mask=m, other=0.0).to(bits_ty, bitcast=True)
            n_gt += tl.sum((m & (bits > lo)).to(tl.int32), axis=0)
        n_eq_before = tl.zeros([], tl.int32)
        for r0 in range(start, end, BLOCK):
            r = r0 + tl.arange(0, BLOCK)
            m = r < end
            a = tl.load(row_to_assign_ptr + r, mask=m, other=0)
            bits = tl.load(weights_ptr + a, mask=m, other=0.0).to(bits_ty, bitcast=True)
            eq = (m & (bits == lo)).to(tl.int32)
            tie_rank = n_eq_before + tl.cumsum(eq, axis=0) - eq
            keep = (bits > lo) | ((eq != 0) & (n_gt + tie_rank < capacity))
            drop = m & ~keep
            n_eq_before += tl.sum(eq, axis=0)
            tl.store(assign_to_row_ptr + a, tl.full([BLOCK], -1, tl.int32), mask=drop)
            tl.store(row_to_assign_ptr + r, tl.full([BLOCK], -1, tl.int32), mask=drop)
            r64 = r.to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                zero = tl.zeros([BLOCK, BLOCK_D], x_sorted_ptr.dtype.element_ty)
                tl.store(x_sorted_ptr + r64[:, None] * D + cols[None, :], zero,
                         mask=drop[:, None] & (cols < D)[None, :])


def _capacity_drop_torch(x_sorted, topk_weights, assign_to_row, row_to_assign, expert_ends, capacity):
    valid = assign_to_row >= 0
    experts = torch.searchsorted(expert_ends.long(), assign_to_row.long(), right=True)
    keep = capacity_keep(experts.view(topk_weights.shape), topk_weights, expert_ends.numel(), capacity)
    drop = valid & ~keep
    rows = assign_to_row.long()[drop]
    row_to_assign[rows] = -1
    x_sorted[rows] = 0
    assign_to_row[drop] = -1
    return drop.sum().reshape(1).to(torch.int32)


def capacity_drop(x_sorted, topk_weights, assign_to_row, row_to_assign, expert_ends, capacity: int):
    """Capacity on a dropless layout, in place: each expert keeps its ``capacity`` highest-weight
    rows (ties: token order); dropped rows get ``-1`` in both maps and zeros in ``x_sorted``.

    ``x_sorted`` ``[A, D]``, ``topk_weights`` ``[N, K]`` (non-negative), maps and ``expert_ends``
    as from ``layout_and_gather``. Returns ``dropped`` ``[1]`` int32. One launch, no host sync.
    """
    num_experts = expert_ends.numel()
    n, k = topk_weights.shape
    weights = topk_weights.reshape(-1).contiguous()
    if n == 0:
        return torch.zeros(1, dtype=torch.int32, device=x_sorted.device)
    if not use_triton(x_sorted):
        return _capacity_drop_torch(x_sorted, topk_weights, assign_to_row, row_to_assign, expert_ends,
                                    capacity)
    dropped = torch.empty(1, dtype=torch.int32, device=x_sorted.device)
    d = x_sorted.shape[1]
    _capacity_drop_kernel[(num_experts,)](
        weights, assign_to_row, row_to_assign, expert_ends, x_sorted, dropped, d, num_experts, capacity,
        FP64=weights.dtype == torch.float64, BLOCK=1024, BLOCK_D=min(64, next_power_of_2(max(d, 1))),
        BLOCK_E=next_power_of_2(num_experts),
    )
    return dropped


def capacity_keep(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Per expert, keep the ``capacity`` assignments with the highest weight.

    Ties go to the lower assignment index (token order). ``topk_ids`` ``[N, K]`` int32,
    ``topk_weights`` ``[N, K]``; returns ``keep`` ``[A]`` bool. Sort-based, no host sync.
    """
    ids = topk_ids.reshape(-1).long()
    w = topk_weights.reshape(-1)
    a_total = ids.numel()
    dev = ids.device
    if a_total == 0:
        return torch.zeros(0, device=dev, dtype=torch.bool)
    # Two stable sorts: by weight (descending), then by expert. Equal weights keep
    # assignment order, so each expert's group lists its assignments best first.
    by_w = torch.sort(w, descending=True, stable=True).indices
    by_e = torch.sort(ids[by_w], stable=True).indices
    order = by_w[by_e]
    counts = torch.zeros(num_experts, device=dev, dtype=torch.int64).scatter_add_(
        0, ids, torch.ones_like(ids)
    )
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(a_total, device=dev) - starts[ids[order]]
    keep = torch.empty(a_total, device=dev, dtype=torch.bool)
    keep.scatter_(0, order, rank_sorted < capacity)
    return keep


@fast_launch
def _gather_rows_kernel(
    src_ptr,
    src2_ptr,
    row_to_assign_ptr,
    out_ptr,
    out2_ptr,
    R,
    D,
    top_k,
    stride_src,
    stride_src2,
    TWO: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    asg = tl.load(row_to_assign_ptr + rows, mask=rmask, other=-1)
    valid = asg >= 0
    tok = tl.where(valid, asg // top_k, 0).to(tl.int64)
    in_mask = valid[:, None] & cmask[None, :]
    out_off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    out_mask = rmask[:, None] & cmask[None, :]
    x = tl.load(src_ptr + tok[:, None] * stride_src + cols[None, :], mask=in_mask, other=0.0)
    tl.store(out_ptr + out_off, x, mask=out_mask)
    if TWO:  # a second source with the same rows (backward: x and grad_out in one pass)
        x2 = tl.load(src2_ptr + tok[:, None] * stride_src2 + cols[None, :], mask=in_mask, other=0.0)
        tl.store(out2_ptr + out_off, x2, mask=out_mask)


def _gather_rows_torch(src, row_to_assign, top_k):
    valid = row_to_assign >= 0
    tok = torch.where(valid, row_to_assign.long() // top_k, 0)
    return torch.where(valid[:, None], src[tok], torch.zeros((), device=src.device, dtype=src.dtype))


def gather_rows(src: torch.Tensor, row_to_assign: torch.Tensor, top_k: int,
                second: torch.Tensor | None = None, *, out: torch.Tensor | None = None):
    """``out[r] = src[row_to_assign[r] // top_k]``, zeros where ``row_to_assign[r] == -1``.

    ``src`` ``[N, D]``, ``row_to_assign`` ``[R]`` int32; returns ``[R, D]`` like ``src``, in
    ``out`` when given (one source only). With ``second`` (``[N, D]``, same dtype) both are
    gathered in one launch: returns ``(out, out2)``.
    """
    _check_single_source(second, out)
    if second is not None and (second.dtype != src.dtype or second.shape != src.shape or not use_triton(src)):
        return gather_rows(src, row_to_assign, top_k), gather_rows(second, row_to_assign, top_k)
    r_total = row_to_assign.numel()
    n, d = src.shape
    if r_total == 0 or d == 0 or n == 0:
        zeros = torch.zeros(r_total, d, device=src.device, dtype=src.dtype)
        return deliver(zeros, out, "out") if second is None else (zeros, zeros.clone())
    if not use_triton(src):
        return deliver(_gather_rows_torch(src, row_to_assign, top_k), out, "out")
    src, src2, out, out2 = _row_copy_buffers(src, second, r_total, out)
    block_r, block_d = row_blocks(d, _GATHER_ELEMS, 256)
    grid = (cdiv(r_total, block_r), cdiv(d, block_d))
    _gather_rows_kernel[grid](
        src, src2, row_to_assign, out, out2, r_total, d, top_k, src.stride(0), src2.stride(0),
        TWO=second is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out if second is None else (out, out2)


def _check_single_source(second, out) -> None:
    if second is not None and out is not None:
        raise ValueError("out is for a one-source row copy; pass second=None with out")


def _row_copy_buffers(src, second, r_total: int, out=None):
    """Unit-stride sources and ``[r_total, D]`` outputs (``out`` when given, else fresh) of a one- or
    two-source row copy (``second`` None: the second source and output alias the first)."""
    src = src if src.stride(1) == 1 else src.contiguous()
    out = out_buffer(out, (r_total, src.shape[1]), src.dtype, src.device, "out")
    if second is None:
        return src, src, out, out
    second = second if second.stride(1) == 1 else second.contiguous()
    return src, second, out, torch.empty_like(out)


@fast_launch
def _scatter_rows_kernel(
    src_ptr,
    src2_ptr,
    assign_to_row_ptr,
    out_ptr,
    out2_ptr,
    N,
    D,
    K,
    stride_src,
    stride_src2,
    TWO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Token-major: each source row is read once and written to its K rows (a row-major gather
    # reads it K times, from HBM once x outgrows L2).
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = tokens < N
    cmask = cols < D
    t64 = tokens.to(tl.int64)
    in_mask = nmask[:, None] & cmask[None, :]
    x = tl.load(src_ptr + t64[:, None] * stride_src + cols[None, :], mask=in_mask)
    if TWO:
        x2 = tl.load(src2_ptr + t64[:, None] * stride_src2 + cols[None, :], mask=in_mask)
    for k in range(K):
        row = tl.load(assign_to_row_ptr + t64 * K + k, mask=nmask, other=-1)
        out_mask = (row >= 0)[:, None] & cmask[None, :]
        out_off = row.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(out_ptr + out_off, x, mask=out_mask)
        if TWO:
            tl.store(out2_ptr + out_off, x2, mask=out_mask)


def _scatter_rows_torch(src, assign_to_row, top_k):
    out = src.new_zeros(assign_to_row.numel(), src.shape[1])
    valid = assign_to_row >= 0
    out[assign_to_row[valid].long()] = src.repeat_interleave(top_k, dim=0)[valid]
    return out


def scatter_rows(src: torch.Tensor, assign_to_row: torch.Tensor, top_k: int,
                 second: torch.Tensor | None = None, *, out: torch.Tensor | None = None):
    """``out[assign_to_row[n*K + k]] = src[n]`` for a layout in which every row has an assignment.

    The token-major twin of ``gather_rows`` for the dropless layout (``R = N*K``, ``assign_to_row``
    a permutation): each source row is read once. ``src`` ``[N, D]``, ``assign_to_row`` ``[N*K]``
    int32; returns ``[N*K, D]``, in ``out`` when given (one source only), or the same for
    ``second`` too, in the same launch. Rows no assignment maps to (``-1`` entries: capacity
    drops) are not written by the kernel; layouts with such rows must use ``gather_rows``, which
    zeros them.
    """
    _check_single_source(second, out)
    if second is not None and (second.dtype != src.dtype or second.shape != src.shape):
        return scatter_rows(src, assign_to_row, top_k), scatter_rows(second, assign_to_row, top_k)
    n, d = src.shape
    r_total = assign_to_row.numel()
    if r_total != n * top_k:
        raise ValueError(f"assign_to_row has {r_total} entries, expected N*K = {n}*{top_k}")
    if not use_triton(src) or r_total == 0 or d == 0:
        rows = _scatter_rows_torch(src, assign_to_row, top_k)
        if second is None:
            return deliver(rows, out, "out")
        return rows, _scatter_rows_torch(second, assign_to_row, top_k)
    src, src2, out, out2 = _row_copy_buffers(src, second, r_total, out)
    block_n, block_d = row_blocks(d, _SCATTER_ELEMS, 256)
    _scatter_rows_kernel[(cdiv(n, block_n), cdiv(d, block_d))](
        src, src2, assign_to_row, out, out2, n, d, top_k, src.stride(0), src2.stride(0),
        TWO=second is not None, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out if second is None else (out, out2)


@fast_launch
def _combine_rows_kernel(
    rows_ptr,
    assign_to_row_ptr,
    weights_ptr,
    logit_grad_ptr,
    router_weight_ptr,
    out_ptr,
    N,
    D,
    E,
    stride_rows,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_ROUTER: tl.constexpr,
    FP64: tl.constexpr,
    ROUTER_TF32: tl.constexpr,
    ROUTER_16BIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # K is a constexpr so that the K row loads are unrolled and issued together (H100, fine shape:
    # 294 -> 239 us forward, 296 -> 268 us backward; docs/benchmarks.md, 2026-12-06 third session).
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = tokens < N
    cmask = cols < D
    t64 = tokens.to(tl.int64)
    if FP64:
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float64)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for k in tl.static_range(K):
        asg = t64 * K + k
        row = tl.load(assign_to_row_ptr + asg, mask=nmask, other=-1)
        valid = row >= 0
        y = tl.load(
            rows_ptr + row.to(tl.int64)[:, None] * stride_rows + cols[None, :],
            mask=valid[:, None] & cmask[None, :],
            other=0.0,
        ).to(acc.dtype)
        if HAS_W:
            w = tl.load(weights_ptr + asg, mask=valid, other=0.0).to(acc.dtype)
            y = y * w[:, None]
        acc += y
    mask2 = nmask[:, None] & cmask[None, :]
    if HAS_ROUTER:  # + logit_grad[n] @ router_weight, the router's share of grad_x
        for e0 in range(0, E, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            emask = e < E
            gmask = nmask[:, None] & emask[None, :]
            g = tl.load(logit_grad_ptr + t64[:, None] * E + e[None, :], mask=gmask, other=0.0)
            wmask = emask[:, None] & cmask[None, :]
            rw = tl.load(router_weight_ptr + e[:, None] * D + cols[None, :], mask=wmask, other=0.0)
            if INTERP:  # 16-bit tl.dot is wrong in the interpreter
                acc += tl.dot(g.to(acc.dtype), rw.to(acc.dtype), input_precision="ieee")
            elif ROUTER_16BIT:  # 16-bit operands (as an autocast linear's grad_input): tensor cores
                acc += tl.dot(g, rw)
            elif ROUTER_TF32:  # 16-bit output: tf32 products are far below its rounding
                acc += tl.dot(g.to(acc.dtype), rw.to(acc.dtype), input_precision="tf32")
            else:
                acc += tl.dot(g.to(acc.dtype), rw.to(acc.dtype), input_precision="ieee")
    out_off = t64[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask2)


def _combine_rows_torch(rows, assign_to_row, top_k, weights, addend, acc_dtype):
    n = assign_to_row.numel() // top_k
    a2r = assign_to_row.reshape(n, top_k).long()
    acc = torch.zeros(n, rows.shape[1], device=rows.device, dtype=acc_dtype)
    for k in range(top_k):
        valid = a2r[:, k] >= 0
        y = rows[a2r[:, k].clamp(min=0)].to(acc_dtype)
        if weights is not None:
            y = y * weights.view(n, top_k)[:, k, None].to(acc_dtype)
        acc += torch.where(valid[:, None], y, 0.0)
    if addend is not None:
        acc += addend[0].to(acc_dtype) @ addend[1].to(acc_dtype)
    return acc


def combine_blocks(d: int, num_experts: int, fp64: bool = False) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_D, BLOCK_E, num_warps)`` of ``_combine_rows_kernel`` for width ``d``, with
    the router term when ``num_experts`` > 0 (its dot in fp64 when ``fp64``)."""
    if num_experts == 0:
        return (*row_blocks(d, _COMBINE_ELEMS, 256), 1, 4)
    # The router term's [BLOCK_N, BLOCK_E] x [BLOCK_E, BLOCK_D] dot: wider tiles and 8 warps were
    # faster (docs/benchmarks.md, "Measurements behind code choices"). Its tiles are at least 16
    # wide. Its operands take 2 * (BLOCK_N + BLOCK_D) * BLOCK_E * itemsize bytes of shared memory
    # (sm_90, Triton 3.6), at most 227 KiB: so at most 128 rows, and BLOCK_E 32 in fp64.
    block_n, block_d = row_blocks(max(d, 16), 2 * _COMBINE_ELEMS, 256)
    block_e = min(32 if fp64 else 64, max(16, next_power_of_2(num_experts)))
    return min(max(block_n, 16), 128), block_d, block_e, 8


def combine_rows(
    rows: torch.Tensor,
    assign_to_row: torch.Tensor,
    top_k: int,
    weights: torch.Tensor | None = None,
    logit_grad: torch.Tensor | None = None,
    router_weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[n] = sum_k weights[n, k] * rows[assign_to_row[n*K + k]] + logit_grad[n] @ router_weight``.

    ``rows`` ``[R, D]``, ``assign_to_row`` ``[N*K]`` int32 (``-1`` skipped), ``weights``
    ``[N, K]`` or None (factor 1), ``logit_grad`` ``[N, E]`` and ``router_weight`` ``[E, D]``
    or None (the backward's router term). Accumulates in fp32 (fp64 when any input is fp64)
    in a fixed order; returns ``[N, D]`` of ``out_dtype`` (default ``rows.dtype``), written into
    ``out`` when given (contiguous, on ``rows``' device).
    """
    addend = None if logit_grad is None else (logit_grad, router_weight.contiguous())
    out_dtype = rows.dtype if out_dtype is None else out_dtype
    d = rows.shape[1]
    n = assign_to_row.numel() // top_k if top_k > 0 else 0
    dev = rows.device
    if out is not None:
        check_out(out, (n, d), out_dtype, dev, "out")
    fp64 = any(t is not None and t.dtype == torch.float64 for t in (rows, weights, logit_grad))
    acc_dtype = torch.float64 if fp64 else torch.float32
    if n == 0 or d == 0:
        return torch.zeros(n, d, device=dev, dtype=out_dtype) if out is None else out.zero_()
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    if weights is not None:
        weights = weights.reshape(-1).contiguous()
    if not use_triton(rows):
        acc = _combine_rows_torch(rows, assign_to_row, top_k, weights, addend, acc_dtype)
        return deliver(acc.to(out_dtype), out, "out")
    out = out_buffer(out, (n, d), out_dtype, dev, "out")
    num_experts = 0 if addend is None else addend[0].shape[1]
    block_n, block_d, block_e, warps = combine_blocks(d, num_experts, fp64)
    grid = (cdiv(n, block_n), cdiv(d, block_d))
    _combine_rows_kernel[grid](
        rows,
        assign_to_row,
        rows if weights is None else weights,
        rows if addend is None else addend[0].contiguous(),
        rows if addend is None else addend[1],
        out,
        n,
        d,
        num_experts,
        rows.stride(0),
        K=top_k,
        HAS_W=weights is not None,
        HAS_ROUTER=addend is not None,
        FP64=fp64,
        ROUTER_TF32=out_dtype in (torch.bfloat16, torch.float16),
        ROUTER_16BIT=addend is not None and addend[0].dtype in (torch.bfloat16, torch.float16)
        and addend[0].dtype == addend[1].dtype,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_E=block_e,
        num_warps=warps,
    )
    return out
