"""Triton kernels, one module per kernel family.

Every public wrapper here takes torch tensors and dispatches:
- CUDA tensors, or any tensor when ``TRITON_INTERPRET=1``: the Triton kernel;
- CPU tensors otherwise: a plain torch implementation of the same function.

Each module lists its kernels in ``AOT_SPECS`` (kernel, signature, constexprs) so that
``tests/kernels/test_aot.py`` can compile every kernel for sm_90 on a CPU machine.
"""

import os
import threading

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERP = tl.constexpr(INTERPRET)  # the same, for branches inside kernels
# The interpreter patches triton.language while it runs a kernel and restores it afterwards, so two
# threads interpreting kernels at once break each other (e.g. a JAX callback on an XLA thread and
# torch on the main thread). Every interpreted launch holds this lock; the JAX bridge holds it for
# a whole callback.
INTERPRETER_LOCK = threading.RLock()


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


def fits_output(t: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``t``, a caller's buffer for a result, is a contiguous ``shape`` tensor of ``dtype``
    on ``device``."""
    return tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == device and t.is_contiguous()


def check_output(t: torch.Tensor, shape, dtype: torch.dtype, device: torch.device, name: str) -> None:
    """Raises ``ValueError`` unless ``fits_output(t, shape, dtype, device)``."""
    if not fits_output(t, shape, dtype, device):
        raise ValueError(
            f"{name} must be a contiguous {tuple(shape)} {dtype} tensor on {device}, got "
            f"{tuple(t.shape)} {t.dtype} on {t.device} (strides {t.stride()})"
        )


def output_tensor(out, index: int, shape, dtype: torch.dtype, device: torch.device,
                  name: str) -> torch.Tensor:
    """``out[index]`` (checked) when the caller gives a buffer there, else a new empty tensor.

    ``out``: None, or a sequence of tensors and Nones, one per result of the wrapper.
    """
    t = None if out is None else out[index]
    if t is None:
        return torch.empty(*shape, device=device, dtype=dtype)  # (varargs: cheaper to parse than a tuple)
    check_output(t, shape, dtype, device, name)
    return t


def copy_to_outputs(out, results: tuple, names: tuple) -> tuple:
    """``results`` with each one ``out`` gives a buffer for copied into it (the torch fallbacks)."""
    if out is None:
        return results
    copied = []
    for t, result, name in zip(out, results, names, strict=True):
        if t is not None:
            check_output(t, result.shape, result.dtype, result.device, name)
            result = t.copy_(result)
        copied.append(result)
    return tuple(copied)


def triton_dtype(dtype: torch.dtype) -> str:
    """Triton signature name of a torch dtype (for AOT specs)."""
    return {
        torch.float64: "fp64",
        torch.float32: "fp32",
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.int32: "i32",
        torch.int64: "i64",
    }[dtype]


# Triton versions whose launcher call FastLaunch was verified against (on an H100/H200).
FAST_LAUNCH_TRITON = ("3.6.",)


# Launches kept per kernel before the table is cleared (a key holds raw int arguments, so every
# new shape adds one).
_MAX_SPECIALIZATIONS = 4096


def _hooks_installed() -> bool:
    """True while launch hooks (e.g. a profiler) are installed: they need Triton's own launch."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(getattr(hook, "calls", hook) for hook in hooks)


class FastLaunch:
    """A ``@triton.jit`` kernel whose repeat launches skip Triton's Python dispatch.

    ``kernel[grid](*args, **constexprs)`` in Triton binds and specializes every argument on each
    call, 15-33 us of host time per launch on the benchmark hosts: more than several of these
    kernels take on the GPU. Here the first launch of each specialization goes through Triton
    (compiling if needed) and keeps the compiled kernel; later launches with the same key call its
    launcher directly. The key holds everything Triton specializes on: the device, each tensor's
    dtype and 16-byte alignment (and whether it is on CUDA), each int's value, each tensor
    descriptor's dtype and block shape, the types of other arguments, and the keyword arguments
    (constexprs and launch options). Triton's own path runs instead under the interpreter, on
    Triton versions outside ``FAST_LAUNCH_TRITON``, while launch hooks are installed, or with
    ``FastLaunch.enabled = False``.
    """

    enabled = not INTERPRET and triton.__version__.startswith(FAST_LAUNCH_TRITON)

    def __init__(self, fn):
        self.fn = fn  # the JITFunction (tests/kernels/aot_compile.py unwraps .fn)
        self.compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, trailing arguments)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        if not FastLaunch.enabled or _hooks_installed():
            if INTERPRET:
                with INTERPRETER_LOCK:
                    self.fn[grid](*args, **kwargs)
            else:
                self.fn[grid](*args, **kwargs)
            return
        device = torch._C._cuda_getDevice()
        # Ints by value (which fixes what Triton reads from them: == 1, % 16, width), tensors by
        # dtype, 16-byte alignment and device type, other arguments by type; then the keyword
        # arguments. Tensors reach the launcher as raw pointers, which spares it a data_ptr() call
        # and a driver query per tensor (the first launch, through Triton, checked them).
        key = [device, tuple(kwargs), *kwargs.values()]
        launch_args = []
        for a in args:
            cls = a.__class__
            if cls is int:
                key.append(a)
            elif cls is torch.Tensor or isinstance(a, torch.Tensor):
                ptr = a.data_ptr()
                key.append(a.dtype)
                key.append(ptr % 16 == 0)
                key.append(a.is_cuda)
                a = ptr
            elif cls is TensorDescriptor:  # Triton specializes on its dtype and block shape
                key.append((a.base.dtype, *a.block_shape))
            else:
                key.append(cls)
            launch_args.append(a)
        key = tuple(key)
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.fn[grid](*args, **kwargs)
            if hasattr(compiled, "result"):  # an asynchronous compile
                compiled = compiled.result()
            if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
                if len(self.compiled) >= _MAX_SPECIALIZATIONS:
                    self.compiled.clear()
                self.compiled[key] = (compiled, self._trailing_args(len(args), kwargs))
            return
        compiled, trailing = entry
        grid = (*grid, 1, 1)
        compiled.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *launch_args, *trailing)

    def _trailing_args(self, num_positional: int, kwargs: dict) -> tuple:
        """The parameters after the positional ones, in order: keyword values, else defaults."""
        params = self.fn.params[num_positional:]
        return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)


def fast_launch(fn) -> FastLaunch:
    """``@triton.jit`` for a kernel launched from Python: see ``FastLaunch``."""
    return FastLaunch(triton.jit(fn))
