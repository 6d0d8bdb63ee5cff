"""Compile every kernel listed in ``flashfusemoe.kernels.*.AOT_SPECS`` for sm_90.

Run in a process without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``).
Prints one line per kernel; exits 1 if any failed.
"""

import importlib
import os
import pkgutil
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flashfusemoe.kernels as kernels_pkg  # noqa: E402


def main() -> int:
    failed = 0
    for mod_info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"flashfusemoe.kernels.{mod_info.name}")
        specs = getattr(mod, "AOT_SPECS", None)
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
    sys.exit(main())
