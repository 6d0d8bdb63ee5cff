"""``FastLaunch``: repeat launches of a ``@triton.jit`` kernel without Triton's Python dispatch."""

import ctypes
import functools
import threading

import torch
import triton
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

from flashfusemoe.kernels import INTERPRET, INTERPRETER_LOCK

# Triton versions whose launcher call FastLaunch was verified against (on an H100/H200).
FAST_LAUNCH_TRITON = ("3.6.",)


# Encoded tensor maps kept per compiled kernel before its table is cleared.
_MAX_DESCRIPTORS = 256

try:
    from triton.backends.nvidia.driver import make_tensordesc_arg as _make_tensordesc_arg
except ImportError:  # another Triton layout: FastLaunch keeps Triton's launcher
    _make_tensordesc_arg = None

# Launches kept per kernel before the table is cleared (a key holds raw int arguments, so every
# new shape adds one).
_MAX_SPECIALIZATIONS = 4096


class _ThreadState(threading.local):
    def __init__(self):
        self.devices: set[int] = set()  # the devices this thread has made sure of a CUDA context on


_thread = _ThreadState()


def _ensure_context(device: int) -> None:
    """Makes ``device``'s primary CUDA context current on this thread if no context is.

    A thread that reaches a cached kernel before any CUDA runtime call of its own (torch's
    autograd worker, when every kernel it runs was loaded on another thread) has no current
    context; encoding a TMA descriptor there fails with "invalid device context" before Triton's
    launcher would have set one. Checked once per thread and device."""
    if device in _thread.devices:
        return
    _thread.devices.add(device)
    driver = _libcuda()
    if driver is None:
        return
    ctx = ctypes.c_void_p()
    if driver.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or ctx.value:
        return
    handle = ctypes.c_int()
    if driver.cuDeviceGet(ctypes.byref(handle), device) == 0 and \
            driver.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), handle) == 0:
        driver.cuCtxSetCurrent(ctx)


@functools.cache
def _libcuda():
    """The CUDA driver library (ctypes), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


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
    ``FastLaunch.enabled = False``. Repeat launches call the compiled C launcher itself
    (``_DirectLauncher``) unless ``FastLaunch.direct = False`` or the kernel needs what only
    Triton's Python launcher does (scratch memory); then they go through ``compiled.run``.
    """

    enabled = not INTERPRET and triton.__version__.startswith(FAST_LAUNCH_TRITON)
    direct = True  # call the compiled kernel's C launcher itself (``_DirectLauncher``) where it can

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
        _ensure_context(device)
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
                trailing = self._trailing_args(len(args), kwargs)
                descs = [i for i, a in enumerate((*args, *trailing)) if a.__class__ is TensorDescriptor]
                self.compiled[key] = (compiled, trailing, _direct_launcher(compiled, descs))
            return
        compiled, trailing, direct = entry
        grid = (*grid, 1, 1)
        stream = torch._C._cuda_getCurrentRawStream(device)
        if direct is None or not FastLaunch.direct:
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                         None, None, None, *launch_args, *trailing)
        else:
            direct(grid, stream, launch_args, trailing)

    def _trailing_args(self, num_positional: int, kwargs: dict) -> tuple:
        """The parameters after the positional ones, in order: keyword values, else defaults."""
        params = self.fn.params[num_positional:]
        return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)


class _DirectLauncher:
    """Calls a compiled kernel's C launcher itself, skipping the Python layers Triton 3.6 puts in
    front of it (``CudaLauncher.__call__`` and its tensor-descriptor wrapper).

    Each host-side ``TensorDescriptor`` argument becomes a CUDA tensor map (TMA descriptor) plus
    its shape and strides, as Triton's wrapper makes it; the encoded map is kept per
    (address, shape, strides, padding), so a weight's descriptor is encoded once rather than at
    every launch. The launcher copies the map into the kernel's parameters at launch, so reusing
    the object is safe.
    """

    def __init__(self, compiled, launcher, desc_positions, desc_meta):
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.cooperative = compiled.run.launch_cooperative_grid
        self.pdl = compiled.run.launch_pdl
        self.launcher = launcher
        # (argument position, Triton's metadata for it), last first: expanding one in place
        # leaves the positions before it valid.
        self.descs = list(zip(desc_positions, desc_meta))[::-1]
        self.desc_cache: dict[tuple, list] = {}

    def __call__(self, grid, stream, launch_args, trailing):
        args = [*launch_args, *trailing]
        cache = self.desc_cache
        for pos, meta in self.descs:
            a = args[pos]
            key = (a.base.data_ptr(), *a.shape, *a.strides, a.padding, pos)
            parts = cache.get(key)
            if parts is None:
                if len(cache) >= _MAX_DESCRIPTORS:
                    cache.clear()
                parts = cache[key] = _make_tensordesc_arg(a, meta)
            args[pos:pos + 1] = parts
        self.launcher(grid[0], grid[1], grid[2], stream, self.function, self.cooperative, self.pdl,
                      None, None, self.packed_metadata, None, None, None, *args)


def _direct_launcher(compiled, desc_positions: list[int]) -> "_DirectLauncher | None":
    """A ``_DirectLauncher`` for ``compiled`` (its descriptor arguments at ``desc_positions``), or
    None where Triton's own launcher must run: a kernel that needs scratch memory, descriptors
    lowered without TMA, or launcher internals other than Triton 3.6's."""
    run = compiled.run
    if _make_tensordesc_arg is None:
        return None
    if any(getattr(run, a, 1) for a in ("global_scratch_size", "profile_scratch_size")):
        return None
    launch = getattr(run, "launch", None)
    code = getattr(launch, "__code__", None)
    if launch is None or (code is None) != (not desc_positions):
        return None
    if code is None:  # the C launcher itself: the kernel takes no descriptors
        return _DirectLauncher(compiled, launch, [], [])
    # Triton's descriptor wrapper: a closure over the C launcher and the descriptors' metadata.
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch.__closure__ or ())))
    launcher, meta = cells.get("launcher"), cells.get("tensordesc_meta")
    if launcher is None or not meta or len(meta) != len(desc_positions) or any(m is None for m in meta):
        return None
    return _DirectLauncher(compiled, launcher, desc_positions, list(meta))


def fast_launch(fn) -> FastLaunch:
    """``@triton.jit`` for a kernel launched from Python: see ``FastLaunch``."""
    return FastLaunch(triton.jit(fn))
