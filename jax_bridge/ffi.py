"""A Python function as an XLA FFI handler, without ``jax.experimental.buffer_callback``.

``buffer_callback`` registers its Python function as one of the executable's *host callbacks*,
and JAX runs every executable that has host callbacks through its Python dispatch path (no C++
fast path, runtime tokens threaded through each call). This module instead registers one FFI
handler, written against XLA's stable FFI C API with ``ctypes``, that looks the Python function
up in a registry by an integer attribute of the call. The jitted program then has no host
callbacks and keeps JAX's C++ dispatch.

``python_call(fn, result_shape_dtypes, vmap_method=...)(*args)`` is the counterpart of
``buffer_callback(fn, ...)``: at execution ``fn(ctx, outs, *args)`` runs with ``ctx.stream`` (the
CUDA stream as an int, or None on the CPU) and ``Buffer`` objects (``Buffer.to_torch()`` views
one). An exception in ``fn`` fails the XLA execution with its traceback as the message.
"""

from __future__ import annotations

import ctypes as C
import functools
import itertools
import math
import struct
import threading
import traceback

import jax
import numpy as np

# ---------------------------------------------------------------------------------------------
# XLA FFI C API structs (xla/ffi/api/c_api.h, API version 0.x)
# ---------------------------------------------------------------------------------------------

_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3
_ERROR_INTERNAL = 13
_ATTR_SCALAR = 3


class _ExtensionBase(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("type", C.c_int), ("next", C.c_void_p)]


class _ApiVersion(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
                ("major_version", C.c_int), ("minor_version", C.c_int)]


class _Metadata(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("api_version", _ApiVersion), ("traits", C.c_uint32),
                ("state_type_id", C.c_int64)]


class _MetadataExtension(C.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", C.POINTER(_Metadata))]


class _Buffer(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("dtype", C.c_int),
                ("data", C.c_void_p), ("rank", C.c_int64), ("dims", C.POINTER(C.c_int64))]


class _Scalar(C.Structure):
    _fields_ = [("dtype", C.c_int), ("value", C.c_void_p)]


class _StreamGetArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("ctx", C.c_void_p),
                ("stream", C.c_void_p)]


class _ErrorCreateArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("message", C.c_char_p),
                ("errc", C.c_int)]


class _OrdinalGetArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("ctx", C.c_void_p),
                ("device_ordinal", C.c_int32)]


_HANDLER = C.CFUNCTYPE(C.c_void_p, C.c_void_p)  # XLA_FFI_Error* (XLA_FFI_CallFrame*)
_ERROR_CREATE = C.CFUNCTYPE(C.c_void_p, C.POINTER(_ErrorCreateArgs))
_STREAM_GET = C.CFUNCTYPE(C.c_void_p, C.POINTER(_StreamGetArgs))
_ORDINAL_GET = C.CFUNCTYPE(C.c_void_p, C.POINTER(_OrdinalGetArgs))
# Offsets into XLA_FFI_Api of its first function pointers: struct_size, extension_start,
# api_version (24 bytes), internal_api, then Error_Create, Error_GetMessage, Error_Destroy,
# Handler_Register, Stream_Get.
_API_VERSION = 8 + 8
_API_ERROR_CREATE = _API_VERSION + C.sizeof(_ApiVersion) + 8
_API_STREAM_GET = _API_ERROR_CREATE + 4 * 8
_API_DEVICE_ORDINAL_GET = _API_ERROR_CREATE + 17 * 8  # the 18th function, read where the struct has it

# XLA_FFI_DataType -> numpy dtype name
_DTYPES = {1: "bool", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "uint8", 7: "uint16",
           8: "uint32", 9: "uint64", 10: "float16", 11: "float32", 12: "float64", 16: "bfloat16"}


# ---------------------------------------------------------------------------------------------
# What the Python function receives
# ---------------------------------------------------------------------------------------------


class ExecutionContext:
    """``stream``: the CUDA stream XLA runs the call on, as an int (None on the CPU)."""

    __slots__ = ("stream",)

    def __init__(self, stream):
        self.stream = stream


class Buffer:
    """One argument or result buffer: ``shape``, ``dtype`` (a numpy dtype name), ``data`` (its
    address); ``to_torch()`` views it."""

    __slots__ = ("shape", "dtype", "data", "_device")

    def __init__(self, shape, dtype, data, device):
        self.shape, self.dtype, self.data, self._device = shape, dtype, data, device

    def __dlpack_device__(self):
        return self._device

    def to_torch(self):
        """A zero-copy torch view of the buffer (valid while XLA keeps it: during the call).

        The bytes are wrapped as a uint8 array (``__cuda_array_interface__`` on the GPU, numpy on
        the CPU; torch keeps that wrapper alive as long as the view's storage) and viewed with
        the buffer's dtype, which also covers bfloat16, a dtype neither interface names.
        """
        import torch

        dtype = getattr(torch, self.dtype)
        nbytes = math.prod(self.shape) * dtype.itemsize
        on_cpu = self._device[0] == 1
        device = torch.device("cpu") if on_cpu else torch.device("cuda", self._device[1])
        if nbytes == 0 or not self.data:
            return torch.empty(self.shape, dtype=dtype, device=device)
        if on_cpu:
            raw = torch.from_numpy(np.frombuffer((C.c_uint8 * nbytes).from_address(self.data), np.uint8))
        else:
            raw = torch.as_tensor(_CudaBytes(self.data, nbytes), device=device)
        return raw.view(dtype).view(self.shape)


class _CudaBytes:
    """``nbytes`` of device memory at ``data``, as ``__cuda_array_interface__`` (version 3)."""

    def __init__(self, data: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (data, False),
                                         "strides": None, "version": 3}


# ---------------------------------------------------------------------------------------------
# The handler
# ---------------------------------------------------------------------------------------------

_registry: dict[int, object] = {}  # call id -> run(ctx, flat outs, flat args)
_interned: dict[tuple, int] = {}  # (function key, argument tree, result tree) -> call id
_ids = itertools.count(1)
_lock = threading.Lock()
_TARGET = "flashfusemoe_python_call"


# XLA_FFI_CallFrame as read on each execution (64-bit): struct_size, extension_start, api, ctx,
# stage (+4 bytes padding); args and rets (struct_size, extension_start, size, types, items each);
# attrs (struct_size, extension_start, size, types, names, attrs); future.
_FRAME = struct.Struct("<QQQQi4xQQqQQQQqQQQQqQQQQ")
_BUFFER_DATA = 24  # offset of XLA_FFI_Buffer.data


def _pointers(address: int, n: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}Q", C.string_at(address, 8 * n)) if n else ()


def _specs(items: int, n: int) -> tuple[tuple[tuple[int, ...], str], ...]:
    """``(shape, dtype name)`` of each of the ``n`` buffers at ``items`` (an XLA_FFI_Buffer**)."""
    out = []
    for address in _pointers(items, n):
        b = _Buffer.from_address(address)
        out.append((tuple(b.dims[j] for j in range(b.rank)), _DTYPES[b.dtype]))
    return tuple(out)


def _buffers(items: int, specs, device) -> list[Buffer]:
    """Buffers of this execution: the addresses are read, shapes and dtypes are the call's own."""
    return [Buffer(shape, dtype, C.c_void_p.from_address(address + _BUFFER_DATA).value or 0, device)
            for address, (shape, dtype) in zip(_pointers(items, len(specs)), specs)]


def _error(api: int, message: str) -> int:
    create = _ERROR_CREATE(C.c_void_p.from_address(api + _API_ERROR_CREATE).value)
    args = _ErrorCreateArgs(C.sizeof(_ErrorCreateArgs), None, message.encode(errors="replace"),
                            _ERROR_INTERNAL)
    return create(C.byref(args))


def _write_metadata(extension: int, api: int) -> None:
    meta = _MetadataExtension.from_address(extension).metadata.contents
    # The runtime's own API version (the structs read here are those of 0.1, which later minor
    # versions only extend), so any jaxlib accepts the handler.
    major, minor = 0, 1
    if api:
        version = _ApiVersion.from_address(api + _API_VERSION)
        major, minor = version.major_version, version.minor_version
    meta.api_version = _ApiVersion(C.sizeof(_ApiVersion), None, major, minor)
    meta.traits = 0


def _stream_and_ordinal(api: int, ctx: int) -> tuple[int, int]:
    """XLA's CUDA stream for this execution and its device ordinal (FFI API calls)."""
    get = _STREAM_GET(C.c_void_p.from_address(api + _API_STREAM_GET).value)
    sargs = _StreamGetArgs(C.sizeof(_StreamGetArgs), None, ctx, None)
    err = get(C.byref(sargs))
    if err:
        raise _FfiError(err)
    stream = sargs.stream or 0
    ordinal = _ordinals.get(stream)
    if ordinal is None:
        ordinal = 0
        if C.c_size_t.from_address(api).value >= _API_DEVICE_ORDINAL_GET + 8:
            get = _ORDINAL_GET(C.c_void_p.from_address(api + _API_DEVICE_ORDINAL_GET).value)
            oargs = _OrdinalGetArgs(C.sizeof(_OrdinalGetArgs), None, ctx, 0)
            err = get(C.byref(oargs))
            if err:
                raise _FfiError(err)
            ordinal = oargs.device_ordinal
        _ordinals[stream] = ordinal
    return stream, ordinal


class _FfiError(Exception):
    """An error an FFI API call returned, handed back to XLA as it is."""

    def __init__(self, error: int):
        super().__init__(error)
        self.error = error


_ordinals: dict[int, int] = {}  # XLA stream -> device ordinal
_layouts: dict[int, tuple] = {}  # call id -> (argument specs, result specs)


def _make_handler(device_type: int):
    def handler(frame_address):
        frame = _FRAME.unpack(C.string_at(frame_address, _FRAME.size))
        (_, extension, api, ctx, stage, _, _, n_args, _, arg_items, _, _, n_rets, _, ret_items,
         _, _, n_attrs, attr_types, _, attr_values, _) = frame
        if extension and C.c_int.from_address(extension + 8).value == _EXTENSION_METADATA:
            _write_metadata(extension, api)
            return None
        if stage != _STAGE_EXECUTE:
            return None
        try:
            if n_attrs != 1 or C.c_int.from_address(attr_types).value != _ATTR_SCALAR:
                raise ValueError("expected one scalar attribute (the call id)")
            scalar = _Scalar.from_address(C.c_void_p.from_address(attr_values).value)
            call_id = C.c_int64.from_address(scalar.value).value
            layout = _layouts.get(call_id)
            if layout is None:
                layout = _layouts[call_id] = (_specs(arg_items, n_args), _specs(ret_items, n_rets))
            stream, ordinal = (None, 0) if device_type == 1 else _stream_and_ordinal(api, ctx)
            device = (device_type, ordinal)
            _registry[call_id](ExecutionContext(stream), _buffers(ret_items, layout[1], device),
                               _buffers(arg_items, layout[0], device))
            return None
        except _FfiError as e:
            return e.error
        except BaseException:  # noqa: BLE001 (reported to XLA, which raises it in the caller)
            return _error(api, traceback.format_exc())

    return _HANDLER(handler)


_handlers = {}  # platform -> its ctypes handler (kept alive; a platform here is registered)


def _register(platform: str) -> None:
    with _lock:
        if platform in _handlers:
            return
        device_type = {"cpu": 1, "CUDA": 2, "ROCM": 10}[platform]
        handler = _handlers[platform] = _make_handler(device_type)
        try:
            jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(C.cast(handler, C.c_void_p).value),
                                        platform=platform)
        except Exception:  # noqa: BLE001 (a platform this jaxlib does not have)
            pass


def _function_key(fn):
    """A hashable stand-in for ``fn`` that is equal across re-traces of the same call (a
    ``functools.partial`` of the same function and hashable arguments), else None."""
    if isinstance(fn, functools.partial):
        key = (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
    else:
        key = fn
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _call_id_for(fn, in_tree, out_tree, avals) -> int:
    """The registry id of ``fn`` with these argument and result structures and ``avals`` (their
    shapes and dtypes, fixed per id): one per distinct call, so re-tracing, e.g. without
    ``jax.jit``, does not grow the registry."""
    key = _function_key(fn)
    with _lock:
        if key is not None and (key, in_tree, out_tree, avals) in _interned:
            return _interned[(key, in_tree, out_tree, avals)]
        call_id = next(_ids)

        def run(ctx, outs, args):
            fn(ctx, jax.tree.unflatten(out_tree, outs), *jax.tree.unflatten(in_tree, args))

        _registry[call_id] = run
        if key is not None:
            _interned[(key, in_tree, out_tree, avals)] = call_id
        return call_id


def python_call(fn, result_shape_dtypes, *, vmap_method: str | None = None):
    """``buffer_callback``'s counterpart (module docstring): returns ``call(*args)``, ``args`` a
    pytree of arrays; ``fn(ctx, outs, *args)`` gets ``outs`` and ``args`` as ``Buffer`` pytrees of
    the same structures."""
    for platform in ("cpu", "CUDA"):
        _register(platform)
    flat_results, out_tree = jax.tree.flatten(result_shape_dtypes)

    def call(*args):
        flat_args, in_tree = jax.tree.flatten(args)
        avals = tuple((tuple(a.shape), str(a.dtype)) for a in (*flat_args, *flat_results))
        call_id = _call_id_for(fn, in_tree, out_tree, avals)
        results = jax.ffi.ffi_call(_TARGET, flat_results, vmap_method=vmap_method)(
            *flat_args, call_id=np.int64(call_id))
        return jax.tree.unflatten(out_tree, results)

    return call
