"""Compile every kernel listed in ``flashfusemoe.kernels.*.AOT_SPECS`` for sm_90.

A kernel module without ``AOT_SPECS`` has its specs in its test module instead:
``tests/kernels/test_<module>.py`` defines ``aot_specs()``. Arguments, if any, name the modules
to compile (default: all). Run in a process without ``TRITON_INTERPRET`` (the interpreter
replaces ``@triton.jit``). Prints one line per kernel; exits 1 if any failed.
"""

import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flashfusemoe.kernels as kernels_pkg  # noqa: E402


def _test_side_specs(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"test_{name}.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_aot_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "aot_specs", None)
    return fn() if fn is not None else None


def main(only=()) -> int:
    failed = 0
    for mod_info in pkgutil.iter_modules(kernels_pkg.__path__):
        if only and mod_info.name not in only:
            continue
        mod = importlib.import_module(f"flashfusemoe.kernels.{mod_info.name}")
        specs = getattr(mod, "AOT_SPECS", None)
        if specs is None:
            specs = _test_side_specs(mod_info.name)
        if not specs:
            print(f"FAIL {mod_info.name}: no AOT_SPECS")
            failed += 1
            continue
        for i, (kernel, signature, constexprs) in enumerate(specs):
            fn = kernel
            while not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = fn.fn  # unwrap @triton.autotune / @triton.heuristics
            name = f"{mod_info.name}.{fn.__name__}[{i}]"
            try:
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                    target=GPUTarget("cuda", 90, 32),
                )
                assert compiled.asm["ptx"]
                print(f"ok   {name}")
            except Exception:
                failed += 1
                print(f"FAIL {name}\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tuple(sys.argv[1:])))
