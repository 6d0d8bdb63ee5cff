"""Test speed-up: Triton's interpreter without its redundant work.

Under ``TRITON_INTERPRET=1`` each launch patches ``triton.language`` (its builtins bound to the
interpreter) and restores it afterwards. Each call of a ``@triton.jit`` helper inside a kernel
(``tl.sum``, ``tl.zeros``, ``tl.cumsum``, our own helpers) patches again, scanning the modules
with ``inspect.getmembers``: about 1 ms per call, over a third of an interpreted MoE
forward+backward at test sizes. The patch is all-or-nothing per module, and re-patching a
patched module changes nothing, so a helper call whose modules are already patched can skip it.
``install()`` does that, in a process with ``TRITON_INTERPRET=1`` (the test session, and the
subprocesses and spawned ranks that run kernels); where Triton's interpreter lacks the functions
it relies on, it leaves the interpreter as it is.

It also caches the interpreter's type objects: every interpreted operation builds a new
``block_type`` for its result (``get_block_ty``, ``with_element_ty``), a dict of NumPy dtypes
(``_get_np_dtype``), and in ``tl.tensor.__init__`` a ``tl.tuple`` of its shape. Types are never
mutated after construction, so equal ones are shared, and so is what the tensor constructor derives
from its type, where that constructor is the one mirrored here (``_TENSOR_INIT``). With these, one
interpreted gradcheck of the fused layer took 6.6 s instead of 13.6.
"""

import inspect
import math
import os

import triton.language as tl


def _is_patched(obj, name: str) -> bool:
    member = getattr(obj, name, None)
    return member is not None and not tl.core.is_builtin(member)


def _type_key(ty):
    """A hashable key that identifies a scalar, pointer or block type, or None."""
    if type(ty) is tl.dtype:
        return ty.name
    if type(ty) is tl.pointer_type:
        element = _type_key(ty.element_ty)
        return None if element is None else ("ptr", element, ty.address_space, ty.const)
    if type(ty) is tl.block_type:
        return _block_key(ty.element_ty, ty.shape)
    return None


def _block_key(element_ty, shape):
    """``_type_key`` of ``tl.block_type(element_ty, shape)``, without building it."""
    element = _type_key(element_ty)
    return None if element is None else (element, *(getattr(d, "value", d) for d in shape))


def _cache_types(interpreter) -> bool:
    """Shares equal ``block_type``s and caches ``_get_np_dtype``; False where the functions differ."""
    builder = getattr(interpreter, "InterpreterBuilder", None)
    get_np_dtype = getattr(interpreter, "_get_np_dtype", None)
    with_element_ty = getattr(tl.block_type, "with_element_ty", None)
    if builder is None or get_np_dtype is None or with_element_ty is None \
            or getattr(get_np_dtype, "cached", False):
        return False
    get_block_ty = getattr(builder, "get_block_ty", None)
    if get_block_ty is None or list(inspect.signature(get_block_ty).parameters) != ["self", "dtype", "shape"]:
        return False
    blocks: dict = {}
    np_dtypes: dict = {}

    def block_type(element_ty, shape):
        key = _block_key(element_ty, shape)
        try:
            ty = None if key is None else blocks.get(key)
        except TypeError:  # an unhashable dimension
            key = None
        if key is None:
            return tl.block_type(element_ty, shape)
        if ty is None:
            ty = blocks[key] = tl.block_type(element_ty, shape)
        return ty

    def np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if type(tt_dtype) is tl.block_type else tt_dtype
        key = _type_key(scalar)
        if key is None:
            return get_np_dtype(tt_dtype)
        result = np_dtypes.get(key)
        if result is None:
            result = np_dtypes[key] = get_np_dtype(scalar)
        return result

    np_dtype.cached = True
    builder.get_block_ty = lambda self, dtype, shape: block_type(dtype, shape)
    tl.block_type.with_element_ty = lambda self, scalar_ty: block_type(scalar_ty, self.shape)
    interpreter._get_np_dtype = np_dtype
    return True


# tl.tensor.__init__'s statements (comments and docstring left out) as in Triton 3.6-3.9
_TENSOR_INIT = (
    "def __init__(self, handle, type: dtype):",
    "super().__init__()",
    "self.handle = handle",
    "self.shape = type.shape if type.is_block() else ()",
    "self.numel = constexpr(math.prod(self.shape))",
    "self.type = type  # Tensor type (can be block_type)",
    "self.dtype = type.scalar",
    "self.shape = tuple([constexpr(s) for s in self.shape])",
)


def _statements(fn) -> tuple:
    lines = [line.strip() for line in inspect.getsource(fn).splitlines()]
    return tuple(line for line in lines if line and not line.startswith(("#", '"""')))


def _share_tensor_shapes() -> bool:
    """``tl.tensor.__init__`` taking ``(numel, shape, dtype)`` from a per-type cache; False where
    the constructor is not the mirrored one."""
    init = tl.tensor.__init__
    if getattr(init, "shares_shapes", False) or "__init__" in vars(tl.core.base_value):
        return False
    try:
        if _statements(init) != _TENSOR_INIT:
            return False
    except (OSError, TypeError):
        return False
    derived: dict = {}  # type key -> (numel, shape, dtype)

    def tensor_init(self, handle, type):
        key = _type_key(type)  # (a block type's shape holds ints)
        parts = derived.get(key)
        if parts is None:
            shape = type.shape if type.is_block() else ()
            parts = (tl.constexpr(math.prod(shape)), tl.tuple([tl.constexpr(d) for d in shape]), type.scalar)
            if key is not None:
                derived[key] = parts
        self.handle = handle
        self.numel, self.shape, self.dtype = parts
        self.type = type

    tensor_init.shares_shapes = True
    tl.tensor.__init__ = tensor_init
    return True


def install() -> bool:
    """Returns whether the interpreter was changed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    changed = _cache_types(interpreter)
    changed = _share_tensor_shapes() or changed
    original = getattr(interpreter, "_patch_lang", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_cls is None or getattr(original, "skips_redundant", False):
        return changed
    if list(inspect.signature(original).parameters) != ["fn"]:
        return changed

    lang_modules: dict = {}  # id(globals) -> (globals, their size, the language modules among them)

    def patch_lang(fn):
        scope = fn.__globals__
        entry = lang_modules.get(id(scope))
        if entry is None or entry[0] is not scope or entry[1] != len(scope):
            found = [v for v in scope.values() if inspect.ismodule(v) and v in (tl, tl.core)]
            entry = lang_modules[id(scope)] = (scope, len(scope), found)
        langs = entry[2]
        if langs and all(_is_patched(lang, "program_id") for lang in langs) and _is_patched(tl.math, "exp") \
                and _is_patched(tl.core.tensor_descriptor_base, "load"):
            return scope_cls()  # nothing to restore
        return original(fn)

    patch_lang.skips_redundant = True
    interpreter._patch_lang = patch_lang
    return True
