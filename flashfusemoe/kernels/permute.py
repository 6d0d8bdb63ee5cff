"""Expert-sorted row layout: routing maps, row gather and weighted combine.

Names follow ``docs/design.md``: ``A = N*K`` assignments ``a = n*K + k``, ``R`` rows of the
expert-sorted layout (``R = A`` dropless, ``R = E*M`` padded).
"""

import torch
import triton
import triton.language as tl

from flashfusemoe.kernels import triton_dtype, use_triton

_LAYOUT_BLOCK = 2048
_GATHER_ELEMS = 4096  # elements per gather program
_COMBINE_ELEMS = 4096  # output elements per combine program


@triton.jit
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted row layout of the assignments.

    ``topk_ids`` ``[N, K]`` int32, ``keep`` ``[A]`` bool or None (all kept).
    ``rows_per_expert == 0``: dropless, ``R = A``; ``M > 0``: padded, ``R = E*M``.

    Returns ``assign_to_row [A]``, ``row_to_assign [R]``, ``expert_ends [E]``,
    ``tokens_per_expert [E]`` (all assignments, kept or not) and ``num_unplaced [1]``
    (assignments with no row), all int32.
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
        return (
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
        E_BLOCK=triton.next_power_of_2(e_total),
        BLOCK=_LAYOUT_BLOCK,
        num_warps=4,
    )
    return assign_to_row, row_to_assign, expert_ends, tokens_per_expert, num_unplaced


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
    return (
        assign_to_row.to(i32),
        row_to_assign.to(i32),
        expert_ends.to(i32),
        all_counts.to(i32),
        num_unplaced.to(i32),
    )


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


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    row_to_assign_ptr,
    out_ptr,
    R,
    D,
    top_k,
    stride_src,
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
    x = tl.load(
        src_ptr + tok[:, None] * stride_src + cols[None, :],
        mask=valid[:, None] & cmask[None, :],
        other=0.0,
    )
    out_off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_off, x, mask=rmask[:, None] & cmask[None, :])


def _blocks(d: int, target: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(d, 1)), 256)
    return max(1, target // block_d), block_d


def gather_rows(src: torch.Tensor, row_to_assign: torch.Tensor, top_k: int) -> torch.Tensor:
    """``out[r] = src[row_to_assign[r] // top_k]``, zeros where ``row_to_assign[r] == -1``.

    ``src`` ``[N, D]``, ``row_to_assign`` ``[R]`` int32; returns ``[R, D]`` like ``src``.
    """
    r_total = row_to_assign.numel()
    n, d = src.shape
    if r_total == 0 or d == 0 or n == 0:
        return torch.zeros(r_total, d, device=src.device, dtype=src.dtype)
    if src.stride(1) != 1:
        src = src.contiguous()
    if not use_triton(src):
        valid = row_to_assign >= 0
        tok = torch.where(valid, row_to_assign.long() // top_k, 0)
        return torch.where(valid[:, None], src[tok], torch.zeros((), device=src.device, dtype=src.dtype))
    out = torch.empty(r_total, d, device=src.device, dtype=src.dtype)
    block_r, block_d = _blocks(d, _GATHER_ELEMS)
    grid = (triton.cdiv(r_total, block_r), triton.cdiv(d, block_d))
    _gather_rows_kernel[grid](
        src, row_to_assign, out, r_total, d, top_k, src.stride(0), BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out


@triton.jit
def _combine_rows_kernel(
    rows_ptr,
    assign_to_row_ptr,
    weights_ptr,
    addend_ptr,
    out_ptr,
    N,
    D,
    K,
    stride_rows,
    stride_addend,
    HAS_W: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = tokens < N
    cmask = cols < D
    t64 = tokens.to(tl.int64)
    if FP64:
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float64)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for k in range(K):
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
    if HAS_ADDEND:
        add = tl.load(addend_ptr + t64[:, None] * stride_addend + cols[None, :], mask=mask2, other=0.0)
        acc += add.to(acc.dtype)
    out_off = t64[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask2)


def combine_rows(
    rows: torch.Tensor,
    assign_to_row: torch.Tensor,
    top_k: int,
    weights: torch.Tensor | None = None,
    addend: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``out[n] = sum_k weights[n, k] * rows[assign_to_row[n*K + k]] + addend[n]``.

    ``rows`` ``[R, D]``, ``assign_to_row`` ``[N*K]`` int32 (``-1`` skipped), ``weights``
    ``[N, K]`` or None (factor 1), ``addend`` ``[N, D]`` or None. Accumulates in fp32 (fp64
    when any input is fp64) in a fixed k order; returns ``[N, D]`` of ``out_dtype``
    (default ``rows.dtype``).
    """
    out_dtype = rows.dtype if out_dtype is None else out_dtype
    d = rows.shape[1]
    n = assign_to_row.numel() // top_k if top_k > 0 else 0
    dev = rows.device
    fp64 = any(t is not None and t.dtype == torch.float64 for t in (rows, weights, addend))
    acc_dtype = torch.float64 if fp64 else torch.float32
    if n == 0 or d == 0:
        return torch.zeros(n, d, device=dev, dtype=out_dtype)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    if addend is not None and addend.stride(1) != 1:
        addend = addend.contiguous()
    if weights is not None:
        weights = weights.reshape(-1).contiguous()
    if not use_triton(rows):
        a2r = assign_to_row.reshape(n, top_k).long()
        acc = torch.zeros(n, d, device=dev, dtype=acc_dtype)
        for k in range(top_k):
            valid = a2r[:, k] >= 0
            y = rows[a2r[:, k].clamp(min=0)].to(acc_dtype)
            if weights is not None:
                y = y * weights.view(n, top_k)[:, k, None].to(acc_dtype)
            acc += torch.where(valid[:, None], y, 0.0)
        if addend is not None:
            acc += addend.to(acc_dtype)
        return acc.to(out_dtype)
    out = torch.empty(n, d, device=dev, dtype=out_dtype)
    block_n, block_d = _blocks(d, _COMBINE_ELEMS)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    _combine_rows_kernel[grid](
        rows,
        assign_to_row,
        rows if weights is None else weights,
        rows if addend is None else addend,
        out,
        n,
        d,
        top_k,
        rows.stride(0),
        0 if addend is None else addend.stride(0),
        HAS_W=weights is not None,
        HAS_ADDEND=addend is not None,
        FP64=fp64,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out


def _aot_specs() -> list:
    specs = []
    i32 = "i32"
    for has_keep in (False, True):
        for padded in (False, True):
            sig = {
                "ids_ptr": "*i32",
                "keep_ptr": "*u8" if has_keep else "*i32",
                "assign_to_row_ptr": "*i32",
                "row_to_assign_ptr": "*i32",
                "expert_ends_ptr": "*i32",
                "tokens_per_expert_ptr": "*i32",
                "num_unplaced_ptr": "*i32",
                "A": i32,
                "E": i32,
                "M": i32,
                "HAS_KEEP": "constexpr",
                "PADDED": "constexpr",
                "E_BLOCK": "constexpr",
                "BLOCK": "constexpr",
            }
            specs.append(
                (
                    _expert_layout_kernel,
                    sig,
                    {"HAS_KEEP": has_keep, "PADDED": padded, "E_BLOCK": 64, "BLOCK": _LAYOUT_BLOCK},
                )
            )
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        t = triton_dtype(dtype)
        block_r, block_d = _blocks(4096, _GATHER_ELEMS)
        sig = {
            "src_ptr": f"*{t}",
            "row_to_assign_ptr": "*i32",
            "out_ptr": f"*{t}",
            "R": i32,
            "D": i32,
            "top_k": i32,
            "stride_src": i32,
            "BLOCK_R": "constexpr",
            "BLOCK_D": "constexpr",
        }
        specs.append((_gather_rows_kernel, sig, {"BLOCK_R": block_r, "BLOCK_D": block_d}))
    block_n, block_d = _blocks(4096, _COMBINE_ELEMS)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        t = triton_dtype(dtype)
        fp64 = dtype == torch.float64
        acc_t = "fp64" if fp64 else "fp32"
        for has_w, has_add in ((True, False), (False, True), (False, False), (True, True)):
            sig = {
                "rows_ptr": f"*{t}",
                "assign_to_row_ptr": "*i32",
                "weights_ptr": f"*{acc_t}" if has_w else f"*{t}",
                "addend_ptr": f"*{acc_t}" if has_add else f"*{t}",
                "out_ptr": f"*{t}",
                "N": i32,
                "D": i32,
                "K": i32,
                "stride_rows": i32,
                "stride_addend": i32,
                "HAS_W": "constexpr",
                "HAS_ADDEND": "constexpr",
                "FP64": "constexpr",
                "BLOCK_N": "constexpr",
                "BLOCK_D": "constexpr",
            }
            consts = {
                "HAS_W": has_w,
                "HAS_ADDEND": has_add,
                "FP64": fp64,
                "BLOCK_N": block_n,
                "BLOCK_D": block_d,
            }
            specs.append((_combine_rows_kernel, sig, consts))
    return specs


AOT_SPECS = _aot_specs()
