"""GLU activations of the expert MLP: ``a = act(g) * u`` with ``g = h[:, :F]``, ``u = h[:, F:]``.

``act`` is silu (``"swiglu"``), exact erf gelu (``"geglu"``) or ``relu(g)**2`` (``"relu2"``).
Math runs in fp32 (fp64 for fp64 inputs).
"""

import torch
import triton
import triton.language as tl

from flashfusemoe.kernels import (
    cdiv,
    check_out,
    compute_dtype,
    deliver,
    out_buffer,
    row_blocks,
    use_triton,
)
from flashfusemoe.kernels.launch import fast_launch

ACTIVATIONS = ("swiglu", "geglu", "relu2")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
SQRT_HALF = tl.constexpr(_SQRT_HALF)
INV_SQRT_2PI = tl.constexpr(_INV_SQRT_2PI)


@triton.jit
def _upcast(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _act(g, ACT: tl.constexpr):
    # Constants through tl.full so that fp64 keeps full precision (a Python float literal
    # may be materialised as fp32).
    one = tl.full([], 1.0, g.dtype)
    if ACT == 0:
        out = g / (one + tl.exp(-g))
    elif ACT == 1:
        out = 0.5 * g * (one + tl.erf(g * tl.full([], SQRT_HALF, g.dtype)))
    else:
        r = tl.maximum(g, tl.zeros_like(g))
        out = r * r
    return out


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    one = tl.full([], 1.0, g.dtype)
    if ACT == 0:
        s = one / (one + tl.exp(-g))
        act = g * s
        dact = s * (one + g * (one - s))
    elif ACT == 1:
        cdf = 0.5 * (one + tl.erf(g * tl.full([], SQRT_HALF, g.dtype)))
        act = g * cdf
        dact = cdf + g * tl.exp(-0.5 * g * g) * tl.full([], INV_SQRT_2PI, g.dtype)
    else:
        r = tl.maximum(g, tl.zeros_like(g))
        act = r * r
        dact = 2.0 * r
    return act, dact


@fast_launch
def _glu_forward_kernel(
    h_ptr,
    a_ptr,
    h_copy_ptr,
    R,
    F,
    stride_h,
    ACT: tl.constexpr,
    FP64: tl.constexpr,
    COPY_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < R)[:, None] & (cols < F)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g_ptrs = h_ptr + r64 * stride_h + cols[None, :]
    g_raw = tl.load(g_ptrs, mask=mask, other=0.0)
    u_raw = tl.load(g_ptrs + F, mask=mask, other=0.0)
    if COPY_H:  # h_copy is contiguous [R, 2F]
        copy_ptrs = h_copy_ptr + r64 * (2 * F) + cols[None, :]
        tl.store(copy_ptrs, g_raw, mask=mask)
        tl.store(copy_ptrs + F, u_raw, mask=mask)
    g = _upcast(g_raw, FP64)
    u = _upcast(u_raw, FP64)
    a = _act(g, ACT) * u
    tl.store(a_ptr + r64 * F + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


def _check_activation(activation: str) -> int:
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _ACT_CODE[activation]


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


def _gelu_grad(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(g * _SQRT_HALF)) + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI


# The torch side's one table of gate activations: name -> (act, d act / d g). The layer's shared
# expert uses it too; the independent references keep their own definitions on purpose.
ACT_TORCH = {
    "swiglu": torch.nn.functional.silu,
    "geglu": torch.nn.functional.gelu,
    "relu2": lambda g: torch.relu(g).square(),
}
ACT_GRAD_TORCH = {"swiglu": _silu_grad, "geglu": _gelu_grad, "relu2": lambda g: 2 * torch.relu(g)}


def _glu_forward_torch(h: torch.Tensor, activation: str) -> torch.Tensor:
    f = h.shape[1] // 2
    cdt = compute_dtype(h.dtype)
    g, u = h[:, :f].to(cdt), h[:, f:].to(cdt)
    return (ACT_TORCH[activation](g) * u).to(h.dtype)


def glu_forward(h: torch.Tensor, activation: str, h_copy: torch.Tensor | None = None) -> torch.Tensor:
    """``a = act(h[:, :F]) * h[:, F:]``: ``h`` ``[R, 2F]`` -> ``a`` ``[R, F]`` of ``h.dtype``.

    ``h_copy``: a buffer that also receives ``h``, from the same reads (the JAX bridge's residual
    buffer; checked as every result buffer).
    """
    code = _check_activation(activation)
    r_total, two_f = h.shape
    f = two_f // 2
    if r_total == 0 or f == 0 or not use_triton(h):
        deliver(h, h_copy, "h_copy")
        return _glu_forward_torch(h, activation)
    if h_copy is not None:
        check_out(h_copy, h.shape, h.dtype, h.device, "h_copy")
    if h.stride(1) != 1:
        h = h.contiguous()
    a = torch.empty(r_total, f, device=h.device, dtype=h.dtype)
    block_r, block_f = row_blocks(f, 4096, 128)
    grid = (cdiv(r_total, block_r), cdiv(f, block_f))
    _glu_forward_kernel[grid](
        h,
        a,
        a if h_copy is None else h_copy,
        r_total,
        f,
        h.stride(0),
        ACT=code,
        FP64=h.dtype == torch.float64,
        COPY_H=h_copy is not None,
        BLOCK_R=block_r,
        BLOCK_F=block_f,
    )
    return a


@fast_launch
def _glu_backward_kernel(
    h_ptr,
    da_ptr,
    row_to_assign_ptr,
    weights_ptr,
    dh_ptr,
    a_weighted_ptr,
    grad_w_row_ptr,
    R,
    F,
    stride_h,
    stride_da,
    ACT: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    asg = tl.load(row_to_assign_ptr + rows, mask=rmask, other=-1)
    # Rows without an assignment may hold garbage: never load them, write exact zeros.
    valid = asg >= 0
    w = _upcast(tl.load(weights_ptr + asg.to(tl.int64), mask=valid, other=0.0), FP64)
    r64 = rows.to(tl.int64)[:, None]
    if FP64:
        gw = tl.zeros([BLOCK_R], tl.float64)
    else:
        gw = tl.zeros([BLOCK_R], tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        cmask = (cols < F)[None, :]
        out_mask = rmask[:, None] & cmask
        vmask = valid[:, None] & cmask
        h_ptrs = h_ptr + r64 * stride_h + cols[None, :]
        g = _upcast(tl.load(h_ptrs, mask=vmask, other=0.0), FP64)
        u = _upcast(tl.load(h_ptrs + F, mask=vmask, other=0.0), FP64)
        da = _upcast(tl.load(da_ptr + r64 * stride_da + cols[None, :], mask=vmask, other=0.0), FP64)
        act, dact = _act_and_grad(g, ACT)
        a = act * u
        zero = tl.zeros_like(a)
        dg = tl.where(vmask, w[:, None] * (da * u * dact), zero)
        du = tl.where(vmask, w[:, None] * (da * act), zero)
        aw = tl.where(vmask, w[:, None] * a, zero)
        gw += tl.sum(tl.where(vmask, da * a, zero), axis=1)
        dh_ptrs = dh_ptr + r64 * (2 * F) + cols[None, :]
        tl.store(dh_ptrs, dg.to(dh_ptr.dtype.element_ty), mask=out_mask)
        tl.store(dh_ptrs + F, du.to(dh_ptr.dtype.element_ty), mask=out_mask)
        tl.store(
            a_weighted_ptr + r64 * F + cols[None, :], aw.to(a_weighted_ptr.dtype.element_ty), mask=out_mask
        )
    tl.store(grad_w_row_ptr + rows, gw, mask=rmask)


def _glu_backward_torch(h, da, activation, row_to_assign, weights):
    f = h.shape[1] // 2
    cdt = compute_dtype(h.dtype)
    valid = row_to_assign >= 0
    v = valid[:, None]
    g = torch.where(v, h[:, :f].to(cdt), 0.0)
    u = torch.where(v, h[:, f:].to(cdt), 0.0)
    dav = torch.where(v, da.to(cdt), 0.0)
    if weights.numel():
        w = torch.where(valid, weights[row_to_assign.long().clamp(min=0)].to(cdt), 0.0)[:, None]
    else:  # no tokens: every (padding) row is invalid
        w = torch.zeros(h.shape[0], 1, device=h.device, dtype=cdt)
    act = ACT_TORCH[activation](g)
    a = act * u
    dh = torch.cat([w * dav * u * ACT_GRAD_TORCH[activation](g), w * dav * act], dim=1)
    dh = torch.where(v, dh, 0.0).to(h.dtype)
    a_weighted = torch.where(v, w * a, 0.0).to(h.dtype)
    grad_w_row = torch.where(v, dav * a, 0.0).sum(1)
    return dh, a_weighted, grad_w_row


def glu_backward(
    h: torch.Tensor,
    da: torch.Tensor,
    activation: str,
    row_to_assign: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    a_weighted_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the weighted GLU.

    ``h`` ``[R, 2F]``, ``da`` ``[R, F]`` (gradient of the unweighted ``a``), ``row_to_assign``
    ``[R]`` int32, ``topk_weights`` ``[N, K]``. With ``w_r = topk_weights.flatten()[row_to_assign[r]]``:
    returns ``dh = w_r * da * da/dh`` ``[R, 2F]`` and ``a_weighted = w_r * a`` ``[R, F]`` (both
    ``h.dtype``; ``a_weighted`` in ``a_weighted_out`` when given), and ``grad_w_row = sum_f da * a``
    ``[R]`` (fp32, fp64 for fp64). Rows with ``row_to_assign == -1`` get exact zeros whatever ``h``
    and ``da`` hold there.
    """
    code = _check_activation(activation)
    r_total, two_f = h.shape
    f = two_f // 2
    dev = h.device
    cdt = compute_dtype(h.dtype)
    if a_weighted_out is not None:
        check_out(a_weighted_out, (r_total, f), h.dtype, dev, "a_weighted_out")
    if r_total == 0 or f == 0:
        return (
            torch.zeros(r_total, two_f, device=dev, dtype=h.dtype),
            torch.zeros(r_total, f, device=dev, dtype=h.dtype) if a_weighted_out is None else a_weighted_out,
            torch.zeros(r_total, device=dev, dtype=cdt),
        )
    if h.stride(1) != 1:
        h = h.contiguous()
    if da.stride(1) != 1:
        da = da.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    if not use_triton(h):
        dh, a_weighted, grad_w_row = _glu_backward_torch(h, da, activation, row_to_assign, weights)
        return dh, deliver(a_weighted, a_weighted_out, "a_weighted_out"), grad_w_row
    dh = torch.empty(r_total, two_f, device=dev, dtype=h.dtype)
    a_weighted = out_buffer(a_weighted_out, (r_total, f), h.dtype, dev, "a_weighted_out")
    grad_w_row = torch.empty(r_total, device=dev, dtype=cdt)
    block_r, block_f = row_blocks(f, 2048, 128)
    _glu_backward_kernel[(cdiv(r_total, block_r),)](
        h,
        da,
        row_to_assign,
        weights,
        dh,
        a_weighted,
        grad_w_row,
        r_total,
        f,
        h.stride(0),
        da.stride(0),
        ACT=code,
        FP64=h.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_F=block_f,
    )
    return dh, a_weighted, grad_w_row
