"""Grouped GEMMs over the expert-sorted row layout, with no host synchronisation.

Rows of ``a`` are sorted by expert: expert ``e`` owns rows ``[ends[e-1], ends[e])`` with
``ends = expert_ends`` (``[E]`` int32, on the device, cumulative, ``ends[-1] <= R``). Rows past
``ends[-1]`` are unused and may hold garbage. The counts are never read on the host, except by
the CPU ``"loop"`` backend.

Backends (``backend=`` argument of both public functions):
- ``"tma"``: weight gradients only, a Triton kernel that streams rows through TMA descriptors
  (16-bit, sm90+ or the interpreter; see ``_can_use_tma_wgrad``). Unlike ``torch._grouped_mm``
  it can write into a caller's buffer (``out=``), which spares the JAX bridge a copy; ``"auto"``
  picks it over ``"torch"`` up to ``_TMA_MAX_FLOPS``, where it keeps CUTLASS's speed;
- ``"torch"``: ``torch._grouped_mm`` (CUTLASS, bf16, sm90/sm100, see ``_can_use_torch_grouped_mm``);
- ``"triton"``: the Triton kernels below (any float dtype; CUDA, or CPU under the interpreter);
- ``"loop"``: a torch loop over experts (reads ``expert_ends`` on the host: CPU fallback);
- ``"auto"``: the first of these that applies.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from flashfusemoe.kernels import (
    INTERP,
    INTERPRET,
    cdiv,
    deliver,
    next_power_of_2,
    out_buffer,
    use_triton,
)
from flashfusemoe.kernels.launch import fast_launch

BACKENDS = ("auto", "tma", "torch", "triton", "loop")

# torch._grouped_mm's CUTLASS kernel handles at most 1023 groups (GroupMM.cu).
_TORCH_MAX_GROUPS = 1023
_HAS_TORCH_GROUPED_MM = hasattr(torch, "_grouped_mm") and torch.version.hip is None


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _weight_grad_tile(ends_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of a weight-gradient grid ``(E * cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``
    (an expert's tiles adjacent): ``(e, m0, n0, row_start, row_end)``, expert ``e``'s rows
    ``[row_start, row_end)`` from the cumulative ``ends_ptr``."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_expert = tl.cdiv(M, BLOCK_M) * tiles_n
    e = pid // tiles_per_expert
    tile = pid % tiles_per_expert
    row_start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    row_end = tl.load(ends_ptr + e)
    return e, (tile // tiles_n) * BLOCK_M, (tile % tiles_n) * BLOCK_N, row_start, row_end


@triton.jit
def _dot_acc(a, b, acc):
    """``acc + a @ b`` accumulated in ``acc.dtype`` (fp32, or fp64 for fp64)."""
    if INTERP:
        if a.dtype == tl.bfloat16:
            # bf16 dot is wrong in the interpreter; fp32 on exact upcasts gives the same result.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    elif a.dtype == tl.float64:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
    return acc


@fast_launch
def _grouped_mm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    ends_ptr,
    K,
    N,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``out[rows_e] = a[rows_e] @ B_e`` with ``B_e[k, n] = b[e, k*stride_bk + n*stride_bn]``.

    Grid ``(cdiv(R, BLOCK_M) + E, cdiv(N, BLOCK_N))``: an upper bound on the number of M-tiles;
    program ``pid_m`` finds its expert and tile from ``ends`` and exits if past the last tile.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    ends = tl.load(ends_ptr + offs_e, mask=mask_e, other=0)
    starts = tl.load(ends_ptr + offs_e - 1, mask=mask_e & (offs_e > 0), other=0)
    counts = tl.maximum(ends - starts, 0)
    tiles = tl.where(mask_e, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    if expert >= E:
        return
    tile_start = tl.sum(tl.where(offs_e < expert, tiles, 0), axis=0)
    row_start = tl.sum(tl.where(offs_e == expert, starts, 0), axis=0)
    row_end = tl.sum(tl.where(offs_e == expert, ends, 0), axis=0)

    rows = row_start + (pid_m - tile_start) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    if a_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot_acc(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@fast_launch
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    ends_ptr,
    M,
    N,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[e] = a[rows_e].T @ b[rows_e]``; grid ``(E, cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``.

    Loops over the expert's rows in chunks of ``BLOCK_K``; an empty expert writes zeros.
    """
    e = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)

    row_end = tl.load(ends_ptr + e)
    row_start = tl.load(ends_ptr + tl.maximum(e - 1, 0))
    row_start = tl.where(e > 0, row_start, 0)

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = ms < M
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = ns < N
    rs = tl.arange(0, BLOCK_K)

    if a_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + rs
        mask_r = rows < row_end
        rows64 = rows.to(tl.int64)
        a_t = tl.load(
            a_ptr + rows64[None, :] * stride_ar + ms[:, None] * stride_am,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rows64[:, None] * stride_br + ns[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _dot_acc(a_t, b, acc)

    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@fast_launch
def _grouped_wgrad_tma_kernel(
    a_desc,
    b_desc,
    a_ptr,
    b_ptr,
    out_ptr,
    ends_ptr,
    M,
    N,
    stride_ar,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[e] = a[rows_e].T @ b[rows_e]`` (``out`` contiguous ``[E, M, N]``); one program per
    output tile, grid ``(E * cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``.

    Whole ``BLOCK_K``-row chunks of the expert's rows come through the TMA descriptors (which
    start at any row); the last partial chunk is loaded with a row mask, so no row of a
    neighbouring expert enters the sum. An empty expert writes zeros.
    """
    e, m0, n0, row_start, row_end = _weight_grad_tile(ends_ptr, M, N, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_full = tl.maximum(row_end - row_start, 0) // BLOCK_K
    for i in range(num_full):
        r = row_start + i * BLOCK_K
        acc = _dot_acc(a_desc.load([r, m0]).T, b_desc.load([r, n0]), acc)
    ms = m0 + tl.arange(0, BLOCK_M)
    ns = n0 + tl.arange(0, BLOCK_N)
    r = row_start + num_full * BLOCK_K
    if r < row_end:
        rows = r + tl.arange(0, BLOCK_K)
        mask_r = rows < row_end
        rows64 = rows.to(tl.int64)
        a_t = tl.load(a_ptr + rows64[None, :] * stride_ar + ms[:, None],
                      mask=(ms < M)[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_ptr + rows64[:, None] * stride_br + ns[None, :],
                    mask=mask_r[:, None] & (ns < N)[None, :], other=0.0)
        acc = _dot_acc(a_t, b, acc)
    out_ptrs = out_ptr + e.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(ms < M)[:, None] & (ns < N)[None, :])


def _config(dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """Fixed launch configuration (no autotuning: that would synchronise on first use)."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype in (torch.bfloat16, torch.float16):
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)


def _block_e(num_experts: int) -> int:
    return max(16, next_power_of_2(num_experts))


def _grouped_mm_triton(a, b, expert_ends, trans_b):
    R, K = a.shape
    E = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.empty((R, N), dtype=a.dtype, device=a.device)
    if R == 0 or N == 0:
        return out
    stride_bk, stride_bn = (b.stride(2), b.stride(1)) if trans_b else (b.stride(1), b.stride(2))
    cfg = _config(a.dtype)
    grid = (cdiv(R, cfg["BLOCK_M"]) + E, cdiv(N, cfg["BLOCK_N"]))
    _grouped_mm_kernel[grid](
        a,
        b,
        out,
        expert_ends,
        K,
        N,
        E,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        stride_bk,
        stride_bn,
        out.stride(0),
        out.stride(1),
        BLOCK_E=_block_e(E),
        **cfg,
    )
    return out


def _grouped_mm_weight_grad_triton(a, b, expert_ends, out=None):
    R, M = a.shape
    N = b.shape[1]
    E = expert_ends.shape[0]
    out = out_buffer(out, (E, M, N), a.dtype, a.device, "out", float32_ok=True)
    if out.numel() == 0:
        return out
    if R == 0:
        return out.zero_()
    cfg = _config(a.dtype)
    grid = (E, cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    _grouped_wgrad_kernel[grid](
        a,
        b,
        out,
        expert_ends,
        M,
        N,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        **cfg,
    )
    return out


# Weight gradients of at most this many FLOPs go to the TMA kernel even where torch._grouped_mm
# runs them too: measured against CUTLASS, it matched or beat it below and trailed it above
# (docs/benchmarks.md). A caller's ``out`` buffer (the JAX bridge's) goes to the TMA kernel at any
# size: CUTLASS can't write there, and its result's copy costs more time and memory than it saves.
_TMA_MAX_FLOPS = 2**37


def _tma_config(N: int, interpret: bool = INTERPRET) -> dict:
    """Launch configuration of the TMA weight-gradient kernel for ``N`` output columns: the wide
    tile where it divides N, else a tall one (half as wide: less of the last column tile is
    wasted). Both measured on an H100 in bf16 (docs/benchmarks.md): at N = 1408 the tall tile
    took 949 us against the wide one's 1112."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if N % 256 == 0:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=5)
    return dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)


def _can_use_tma_wgrad(a: torch.Tensor, b: torch.Tensor, expert_ends: torch.Tensor) -> bool:
    """Whether the TMA weight-gradient kernel runs ``a.T @ b`` per expert: 16-bit operands of one
    dtype, row-major with 16-byte aligned data and rows, on an sm90+ GPU (or any tensors under
    the interpreter), and ``expert_ends`` an int32 vector on their device."""
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return False
    if a.dim() != 2 or b.dim() != 2 or expert_ends.dtype != torch.int32 or expert_ends.dim() != 1:
        return False
    index = a.get_device()  # -1 on the CPU
    if a.is_cuda != b.is_cuda or a.is_cuda != expert_ends.is_cuda:
        return False
    if b.get_device() != index or expert_ends.get_device() != index:
        return False
    if not INTERPRET and not (a.is_cuda and _device_capability(index)[0] >= 9):
        return False
    return all(t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.stride(0) % 8 == 0
               and t.data_ptr() % 16 == 0 for t in (a, b))


def _grouped_mm_weight_grad_tma(a, b, expert_ends, out=None):
    R, M = a.shape
    N = b.shape[1]
    E = expert_ends.shape[0]
    out = out_buffer(out, (E, M, N), a.dtype, a.device, "out", float32_ok=True)
    if out.numel() == 0:
        return out
    if R == 0:  # a descriptor needs a non-empty tensor
        return out.zero_()
    cfg = _tma_config(N)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor(a, [R, M], [a.stride(0), 1], [block_k, block_m])
    b_desc = TensorDescriptor(b, [R, N], [b.stride(0), 1], [block_k, block_n])
    grid = (E * cdiv(M, block_m) * cdiv(N, block_n),)
    _grouped_wgrad_tma_kernel[grid](a_desc, b_desc, a, b, out, expert_ends, M, N, a.stride(0), b.stride(0),
                                    **cfg)
    return out


# ---------------------------------------------------------------------------------------------
# torch._grouped_mm
# ---------------------------------------------------------------------------------------------


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_row_major(t: torch.Tensor) -> bool:
    """Last dim contiguous, row stride and (3-D) batch stride 16-byte aligned, sizes 8-aligned.

    The multiple-of-8 sizes keep torch's padded output contiguous and leave no ambiguity in
    how ``torch._grouped_mm`` reads the layout. (All operands here are bf16: 8 elements.)
    """
    strides, cols = t.stride(), t.shape[-1]
    return (
        strides[-1] == 1
        and strides[-2] >= cols
        and strides[-2] % 8 == 0
        and cols % 8 == 0
        and (len(strides) == 2 or strides[0] % 8 == 0)
    )


def _can_use_torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, expert_ends: torch.Tensor, op: str) -> bool:
    """Whether ``torch._grouped_mm`` runs ``op`` on its sync-free CUTLASS path.

    ``op``: ``"nt"`` (``a [R, K]``, ``b [E, N, K]``), ``"nn"`` (``b [E, K, N]``) or ``"wgrad"``
    (``a [R, M]``, ``b [R, N]``). Requirements (aten GroupedBlas.cpp, GroupMM.cu,
    GroupMMCommon.cuh): bf16 operands on sm90/sm100 (other devices take a fallback that copies
    ``offs`` to the host), int32 1-D ``offs``, fewer than 1024 groups, 16-byte aligned data
    pointers and strides. For the 2d x 2d weight gradient only the (column-major ``mat_a``,
    row-major ``mat_b``) layout accepts empty groups; that is ``a.T`` and ``b`` with both
    ``a`` and ``b`` row-major.
    """
    # Runs six times per training step: cheap checks first, no torch.device objects.
    if not _HAS_TORCH_GROUPED_MM or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    if not (a.is_cuda and b.is_cuda and expert_ends.is_cuda):
        return False
    index = a.get_device()
    if b.get_device() != index or expert_ends.get_device() != index:
        return False
    if expert_ends.dtype != torch.int32 or expert_ends.dim() != 1 or expert_ends.stride(0) != 1:
        return False
    if not 0 < expert_ends.shape[0] <= _TORCH_MAX_GROUPS:
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.data_ptr() % 16 or b.data_ptr() % 16:
        return False
    if _device_capability(index)[0] not in (9, 10):
        return False
    if not (_tma_row_major(a) and _tma_row_major(b)):
        return False
    if op == "nt":
        return b.shape[1] % 8 == 0
    if op in ("nn", "wgrad"):
        return True
    raise ValueError(f"unknown op {op!r}")


def _grouped_mm_torch(a, b, expert_ends, trans_b):
    return torch._grouped_mm(a, b.transpose(-2, -1) if trans_b else b, offs=expert_ends)


def _grouped_mm_weight_grad_torch(a, b, expert_ends):
    out = torch._grouped_mm(a.t(), b, offs=expert_ends)
    if _device_capability(a.device.index)[0] != 9:
        # Empty groups get exact zeros on sm90 (tested), not on sm100 (pytorch/pytorch#172439).
        counts = torch.diff(expert_ends, prepend=expert_ends.new_zeros(1))
        out.masked_fill_((counts == 0)[:, None, None], 0)
    return out


# ---------------------------------------------------------------------------------------------
# Torch loop (host reads expert_ends)
# ---------------------------------------------------------------------------------------------


def _grouped_mm_loop(a, b, expert_ends, trans_b):
    R = a.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    out = a.new_zeros((R, N))
    start = 0
    for e, end in enumerate(expert_ends.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ (b[e].T if trans_b else b[e])
        start = end
    return out


def _grouped_mm_weight_grad_loop(a, b, expert_ends):
    E = expert_ends.shape[0]
    out = a.new_zeros((E, a.shape[1], b.shape[1]))
    start = 0
    for e, end in enumerate(expert_ends.tolist()):
        if end > start:
            out[e] = a[start:end].T @ b[start:end]
        start = end
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, can_torch: bool, t: torch.Tensor, can_tma: bool = False) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if can_tma:
            return "tma"
        if can_torch:
            return "torch"
        return "triton" if use_triton(t) else "loop"
    if backend == "tma" and not can_tma:
        raise ValueError("the TMA weight-gradient kernel cannot run these inputs (see _can_use_tma_wgrad)")
    if backend == "torch" and not can_torch:
        raise ValueError("torch._grouped_mm cannot run these inputs (see _can_use_torch_grouped_mm)")
    if backend == "triton" and not use_triton(t):
        raise ValueError("the Triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    return backend


def _torch_ok(a, b, expert_ends, op, backend):
    # The capability query is skipped when the backend is forced to something else.
    if backend in ("triton", "loop"):
        return False
    return _can_use_torch_grouped_mm(a, b, expert_ends, op)


def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, expert_ends: torch.Tensor, trans_b: bool, *, backend: str = "auto"
) -> torch.Tensor:
    """Grouped GEMM over expert-sorted rows.

    Args:
        a: ``[R, K]``, rows sorted by expert.
        b: ``[E, N, K]`` if ``trans_b`` else ``[E, K, N]``, same dtype as ``a``.
        expert_ends: ``[E]`` int32 on ``a``'s device, cumulative end row of each expert.
        trans_b: multiply by ``b[e].T`` (forward, ``nn.Linear`` weights) instead of ``b[e]``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"loop"`` (module docstring).

    Returns:
        ``out [R, N]`` with ``out[rows_e] = a[rows_e] @ (b[e].T if trans_b else b[e])``; rows
        ``>= expert_ends[-1]`` are unspecified.
    """
    if backend == "tma":
        raise ValueError("backend 'tma' runs weight gradients only (grouped_mm_weight_grad)")
    can_torch = _torch_ok(a, b, expert_ends, "nt" if trans_b else "nn", backend)
    chosen = _resolve_backend(backend, can_torch, a)
    if chosen == "torch":
        return _grouped_mm_torch(a, b, expert_ends, trans_b)
    if chosen == "triton":
        return _grouped_mm_triton(a, b, expert_ends.contiguous(), trans_b)
    return _grouped_mm_loop(a, b, expert_ends, trans_b)


def grouped_mm_weight_grad(
    a: torch.Tensor, b: torch.Tensor, expert_ends: torch.Tensor, *, backend: str = "auto", out=None
) -> torch.Tensor:
    """Per-expert ``a.T @ b`` over expert-sorted rows (weight gradients).

    Args:
        a: ``[R, M]``, rows sorted by expert.
        b: ``[R, N]``, same rows and dtype as ``a``.
        expert_ends: ``[E]`` int32 on ``a``'s device, cumulative end row of each expert.
        backend: ``"auto"``, ``"tma"``, ``"torch"``, ``"triton"`` or ``"loop"`` (module docstring).
        out: optional ``[E, M, N]`` buffer of ``a``'s dtype, or float32, for the result: the
            Triton and TMA kernels write it in place (their float32 accumulator, rounded only to
            ``out``'s dtype), the other backends copy into it.

    Returns:
        ``out [E, M, N]`` with ``out[e] = a[rows_e].T @ b[rows_e]``: exact zeros for an expert
        with no rows; rows ``>= expert_ends[-1]`` are ignored (they may hold NaN).
    """
    can_tma = backend in ("auto", "tma") and _can_use_tma_wgrad(a, b, expert_ends)
    can_torch = False
    large = out is None and 2 * a.shape[0] * a.shape[1] * b.shape[1] > _TMA_MAX_FLOPS
    if not can_tma or (backend == "auto" and large):
        can_torch = _torch_ok(a, b, expert_ends, "wgrad", backend)
        if can_torch and backend == "auto":
            can_tma = False  # a large problem that CUTLASS runs faster
    chosen = _resolve_backend(backend, can_torch, a, can_tma)
    if chosen == "tma":
        return _grouped_mm_weight_grad_tma(a, b, expert_ends, out)
    if chosen == "torch":
        result = _grouped_mm_weight_grad_torch(a, b, expert_ends)
    elif chosen == "triton":
        return _grouped_mm_weight_grad_triton(a, b, expert_ends.contiguous(), out)
    else:
        result = _grouped_mm_weight_grad_loop(a, b, expert_ends)
    return deliver(result, out, "out", float32_ok=True)
