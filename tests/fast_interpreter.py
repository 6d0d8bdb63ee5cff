"""Test speed-up: Triton's interpreter without its redundant re-patching of ``triton.language``.

Under ``TRITON_INTERPRET=1`` each launch patches ``triton.language`` (its builtins bound to the
interpreter) and restores it afterwards. Each call of a ``@triton.jit`` helper inside a kernel
(``tl.sum``, ``tl.zeros``, ``tl.cumsum``, our own helpers) patches again, scanning the modules
with ``inspect.getmembers``: about 1 ms per call, over a third of an interpreted MoE
forward+backward at test sizes. The patch is all-or-nothing per module, and re-patching a
patched module changes nothing, so a helper call whose modules are already patched can skip it.
``install()`` does that, in a process with ``TRITON_INTERPRET=1`` (the test session, and the
subprocesses and spawned ranks that run kernels); where Triton's interpreter lacks the functions
it relies on, it leaves the interpreter as it is.
"""

import inspect
import os

import triton.language as tl


def _is_patched(obj, name: str) -> bool:
    member = getattr(obj, name, None)
    return member is not None and not tl.core.is_builtin(member)


def install() -> bool:
    """Returns whether the interpreter was changed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_cls is None or getattr(original, "skips_redundant", False):
        return False
    if list(inspect.signature(original).parameters) != ["fn"]:
        return False

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and all(_is_patched(lang, "program_id") for lang in langs) and _is_patched(tl.math, "exp") \
                and _is_patched(tl.core.tensor_descriptor_base, "load"):
            return scope_cls()  # nothing to restore
        return original(fn)

    patch_lang.skips_redundant = True
    interpreter._patch_lang = patch_lang
    return True
