"""Triton kernels, one module per kernel family.

Every public wrapper has one shape: CPU tensors without ``TRITON_INTERPRET=1`` run its torch
fallback; otherwise it allocates its results (or takes the caller's ``*_out`` buffers, checked by
``out_buffer``) and launches the kernel. Kernels are launched through ``launch.fast_launch``.
"""

import os
import threading
import warnings

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERP = tl.constexpr(INTERPRET)  # the same, for branches inside kernels
# The interpreter patches triton.language while it runs a kernel and restores it afterwards, so two
# threads interpreting kernels at once break each other (e.g. a JAX callback on an XLA thread and
# torch on the main thread). Every interpreted launch holds this lock; the JAX bridge holds it for
# a whole callback.
INTERPRETER_LOCK = threading.RLock()


def _numpy_deprecates_int_of_1d() -> bool:
    """Whether ``int()`` of a one-element 1-D numpy array warns (numpy 1.25-2.3) or raises (2.4+)."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            int(np.zeros(1, dtype=np.int32))
        except (TypeError, DeprecationWarning):
            return True
    return False


def _scalar_index(self) -> int:
    """``tensor.__index__`` for the interpreter: the one element of a scalar's array."""
    data = self.handle.data
    if data.size != 1:
        raise TypeError(f"only a scalar converts to an int, got an array of shape {data.shape}")
    return int(data.reshape(-1)[0])


def interpreter_scalar_index_fix(interpreter=None) -> bool:
    """Lets Triton 3.6's interpreter run with numpy >= 2.4; returns whether it patched anything.

    That interpreter turns a scalar kernel argument into a Python int (``range(0, D, BLOCK)``) with
    ``int(array)`` on a one-element 1-D array, which numpy 1.25 deprecated and 2.4 made an error
    (later Triton versions squeeze the array first). With such a numpy, this wraps the
    interpreter's tensor patch so that ``__index__`` reads the one element; a Triton without that
    patch is left as it is.
    ``interpreter``: the module to patch (default ``triton.runtime.interpreter``).
    """
    if interpreter is None:
        from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "scalar_index_fixed", False):
        return False
    if not _numpy_deprecates_int_of_1d():
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)

    patch_lang_tensor.scalar_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if INTERPRET:
    interpreter_scalar_index_fix()


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through a Triton kernel rather than the torch fallback."""
    return t.is_cuda or INTERPRET


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and routing dtype for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a constexpr function, slow on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for ``n <= 0``), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def row_blocks(width: int, target: int, max_block: int) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS)`` of a row-wise kernel: columns up to ``max_block`` wide (a power
    of two), rows to make about ``target`` elements per program."""
    block_cols = min(next_power_of_2(max(width, 1)), max_block)
    return max(1, target // block_cols), block_cols


def check_out(t: torch.Tensor, shape, dtype: torch.dtype, device: torch.device, name: str, *,
              float32_ok: bool = False) -> None:
    """Raises ``ValueError`` unless ``t``, a caller's buffer for a result, is a contiguous ``shape``
    tensor of ``dtype`` (or, with ``float32_ok``, float32) on ``device``."""
    dtype_ok = t.dtype == dtype or (float32_ok and t.dtype == torch.float32)
    if not (tuple(t.shape) == tuple(shape) and dtype_ok and t.device == device and t.is_contiguous()):
        wanted = f"{dtype} or torch.float32" if float32_ok and dtype != torch.float32 else str(dtype)
        raise ValueError(
            f"{name} must be a contiguous {tuple(shape)} {wanted} tensor on {device}, got "
            f"{tuple(t.shape)} {t.dtype} on {t.device} (strides {t.stride()})"
        )


# Caller-given result buffers (``*_out`` arguments), one policy everywhere: a buffer must be a
# contiguous tensor of exactly the result's shape, dtype and device (``ValueError`` otherwise), and
# on return the result is in it. A kernel writes it there (``out_buffer``); a result computed
# elsewhere (a torch fallback, cuBLAS) is copied there once (``deliver``). One exception
# (``float32_ok``): a weight gradient's buffer may be float32 for 16-bit operands, the gradient of
# float32 master weights under autocast; the kernels store their float32 accumulator there.


def out_buffer(out: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device,
               name: str, *, float32_ok: bool = False) -> torch.Tensor:
    """Where a kernel writes a result: the caller's buffer ``out`` (checked), or a new empty tensor."""
    if out is None:
        return torch.empty(*shape, device=device, dtype=dtype)  # (varargs: cheaper to parse than a tuple)
    check_out(out, shape, dtype, device, name, float32_ok=float32_ok)
    return out


def deliver(result: torch.Tensor, out: torch.Tensor | None, name: str, *,
            float32_ok: bool = False) -> torch.Tensor:
    """``result``, placed in the caller's buffer ``out`` (checked) when given and not already there."""
    if out is None or out is result:
        return result
    check_out(out, result.shape, result.dtype, result.device, name, float32_ok=float32_ok)
    if out.data_ptr() != result.data_ptr() or out.numel() == 0:
        out.copy_(result)
    return out
