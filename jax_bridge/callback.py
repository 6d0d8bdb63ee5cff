"""XLA custom calls that run torch: zero-copy views of XLA's buffers, the torch state a
callback runs in (XLA's CUDA stream, no autograd, no autocast), ``shard_map``'s varying-axes types,
and the shape-only stand-ins that let torch's own checks validate JAX arguments. Shared by
``jax_bridge.ops``, ``jax_bridge.experts`` and ``jax_bridge.parallel``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.experimental.buffer_callback import buffer_callback

from flashfusemoe.config import FLOAT_DTYPES, dtype_name
from flashfusemoe.kernels import INTERPRET, INTERPRETER_LOCK
from jax_bridge import ffi

_DL_CUDA, _DL_ROCM = 2, 10
_PREALLOCATION_CHECKED = False
DYNAMIC_SLICE_FUSION_FLAG = "xla_gpu_enable_dynamic_slice_fusion"


def default_xla_flags(env=os.environ) -> None:
    """Turns XLA's dynamic-slice fusion off (``XLA_FLAGS``) unless the user set it either way.

    On the GPU (jax 0.11.2) that pass wraps a callback whose operands are slices of a scan's
    stacked weights into a fusion and keeps the original call too, so under ``lax.scan`` /
    ``nnx.scan`` every MoE layer's forward ran twice. XLA reads ``XLA_FLAGS`` when JAX first
    starts a backend: a program that ran JAX before importing ``jax_bridge`` can pass
    ``jax.jit(..., compiler_options={DYNAMIC_SLICE_FUSION_FLAG: False})`` instead.
    """
    flags = env.get("XLA_FLAGS", "")
    if DYNAMIC_SLICE_FUSION_FLAG not in flags:
        env["XLA_FLAGS"] = f"{flags} --{DYNAMIC_SLICE_FUSION_FLAG}=false".strip()


default_xla_flags()


def _standin(name: str, a) -> torch.Tensor:
    """A storage-less ``meta`` tensor with ``a``'s shape and dtype."""
    if not isinstance(a, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array, got {type(a).__name__}")
    dtype = getattr(torch, jnp.dtype(a.dtype).name, None)
    if not isinstance(dtype, torch.dtype):
        allowed = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must have a floating dtype in ({allowed}), got {jnp.dtype(a.dtype).name}")
    return torch.empty(a.shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------------------------------------
# shard_map: varying-manual-axes types
# ---------------------------------------------------------------------------------------------


def _vma(a) -> frozenset:
    """The manual mesh axes ``a`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(a)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(vma)


def _vary(a, axes: frozenset):
    """``a`` typed as varying over ``axes`` (a type cast, no data movement)."""
    missing = tuple(sorted(axes - _vma(a), key=str))
    if not missing:
        return a
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(a, missing, to="varying")
    return jax.lax.pvary(a, missing)


def _align_varying(*arrays):
    """Casts all inputs to their union of varying axes, outside the custom_vjp.

    A replicated weight used with a sharded ``x`` is cast to varying here; JAX transposes that
    cast into the ``psum`` that sums the weight gradient over devices.
    """
    axes = frozenset().union(*(_vma(a) for a in arrays if a is not None))
    return [None if a is None else _vary(a, axes) for a in arrays]


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------


def _warn_if_xla_preallocates() -> None:
    """Warns once when JAX's GPU allocator would take most of the memory torch needs."""
    global _PREALLOCATION_CHECKED
    if _PREALLOCATION_CHECKED:
        return
    _PREALLOCATION_CHECKED = True
    env = os.environ
    if (
        env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() in ("false", "0")
        or env.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform"
        or "XLA_PYTHON_CLIENT_MEM_FRACTION" in env
    ):
        return
    warnings.warn(
        "JAX preallocates 75% of GPU memory, and the torch kernels behind jax_bridge.fused_moe "
        "allocate their workspace outside it, so they may run out of memory. Set "
        "XLA_PYTHON_CLIENT_PREALLOCATE=false (or a small XLA_PYTHON_CLIENT_MEM_FRACTION) before "
        "JAX starts.",
        RuntimeWarning,
        stacklevel=2,
    )


@functools.lru_cache(maxsize=64)
def _external_stream(stream: int, index: int) -> torch.cuda.ExternalStream:
    return torch.cuda.ExternalStream(stream, device=torch.device("cuda", index))


class _TorchScope:
    """Torch state for one callback: XLA's stream on GPU, no autograd, no autocast.

    The callback runs on the caller's thread, so the caller's torch modes would leak in. This
    runs twice per training step, so it sticks to the low-level setters: the device is switched
    only when it differs, and streams are swapped with ``torch.cuda.set_stream`` on explicit
    indices (``torch.cuda.stream()`` resolves the current device through Python on every use).
    """

    __slots__ = ("ctx", "buffer", "device_type", "grad_enabled", "autocast_enabled", "restore")

    def __init__(self, ctx, buffer):
        self.ctx, self.buffer = ctx, buffer

    def __enter__(self):
        kind, index = self.buffer.__dlpack_device__()
        on_gpu = kind in (_DL_CUDA, _DL_ROCM)
        self.device_type = "cuda" if on_gpu else "cpu"
        self.grad_enabled = torch.is_grad_enabled()
        self.autocast_enabled = torch.is_autocast_enabled(self.device_type)
        with contextlib.ExitStack() as restore:  # unwinds only if entering fails part-way
            if on_gpu:
                _warn_if_xla_preallocates()
                if torch.cuda.current_device() != index:
                    restore.enter_context(torch.cuda.device(index))
                restore.callback(torch.cuda.set_stream, torch.cuda.current_stream(index))
                torch.cuda.set_stream(_external_stream(self.ctx.stream, index))
            elif INTERPRET:  # shard_map on CPU runs one callback per device, in parallel threads
                restore.enter_context(INTERPRETER_LOCK)
            if torch.is_inference_mode_enabled():
                restore.enter_context(torch.inference_mode(False))
            self.restore = restore.pop_all()
        torch.set_grad_enabled(False)
        torch.set_autocast_enabled(self.device_type, False)

    def __exit__(self, *exc):
        torch.set_autocast_enabled(self.device_type, self.autocast_enabled)
        torch.set_grad_enabled(self.grad_enabled)
        self.restore.close()


def python_callback(fn, result_shape_dtypes, *, vmap_method: str = "sequential"):
    """An XLA custom call that runs ``fn(ctx, outs, *args)`` on XLA's buffers: through
    ``jax.experimental.buffer_callback``, or with ``USE_FFI`` through ``jax_bridge.ffi.python_call``
    (no host callbacks in the program, so JAX keeps its C++ dispatch). Same arguments and
    callback contract."""
    if USE_FFI:
        return ffi.python_call(fn, result_shape_dtypes, vmap_method=vmap_method)
    return buffer_callback(fn, result_shape_dtypes, vmap_method=vmap_method)


FFI_ENV = "FLASHFUSEMOE_JAX_FFI"


def ffi_default(env=os.environ) -> bool:
    """``USE_FFI``'s value at import: the environment variable ``FLASHFUSEMOE_JAX_FFI``, "1" (on)
    or "0"/unset (off)."""
    value = env.get(FFI_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{FFI_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


# The custom-call mechanism of ``python_callback``: ``jax_bridge.ffi`` when True. Off by default
# until it has run on a GPU (its CPU tests, and the whole bridge suite run with it on, pass);
# ``buffer_callback`` is the path measured and checked on the H100. ``FLASHFUSEMOE_JAX_FFI=1``
# turns it on for a whole process (a test run, a benchmark).
USE_FFI = ffi_default()


def custom_call_name(use_ffi: bool | None = None) -> str:
    """The custom-call mechanism's name for logs: ``use_ffi``'s, by default ``USE_FFI``'s."""
    return "jax_bridge.ffi" if (USE_FFI if use_ffi is None else use_ffi) else "buffer_callback"

# Torch views of ``jax_bridge.ffi`` buffers, by (address, shape, dtype, device): XLA hands a
# program's buffers the same addresses from call to call, so a view is made once, not per call.
# A view owns nothing (XLA does); it is only used inside a callback, where XLA keeps that memory
# valid for the buffer it describes.
_VIEWS: dict[tuple, torch.Tensor] = {}
_MAX_VIEWS = 4096


def _as_torch(buffer) -> torch.Tensor:
    """A zero-copy torch view of an XLA buffer (compact row-major; used during the call only):
    cached for ``jax_bridge.ffi`` buffers, by DLPack for ``buffer_callback``'s. (The plain,
    unversioned capsule skips the DLPack 1.0 read-only flag, whose handling differs across torch
    versions, and the stream handshake, which the buffer ignores anyway.)"""
    if buffer.__class__ is ffi.Buffer:
        key = (buffer.data, buffer.shape, buffer.dtype, buffer._device)
        view = _VIEWS.get(key)
        if view is None:
            if len(_VIEWS) >= _MAX_VIEWS:
                _VIEWS.clear()
            view = _VIEWS[key] = buffer.to_torch()
        return view
    return torch.from_dlpack(buffer.__dlpack__())
