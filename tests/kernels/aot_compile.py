"""Compile every kernel listed in ``aot_specs.SPECS`` for sm_90.

Run in a process without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``).
Prints one line per kernel; exits 1 if any failed, needs more shared memory than one sm_90 program
may have, or if a module's launched kernel has no spec.
"""

import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).parent))

import triton  # noqa: E402
from aot_specs import SPECS, jit_function, launched_kernels  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flashfusemoe.kernels as kernels_pkg  # noqa: E402

SM90_MAX_SHARED = 232448  # bytes of shared memory one program (CTA) may use on sm_90 (227 KiB)


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
        launched = launched_kernels(mod)
        specs = SPECS[mod_info.name]() if mod_info.name in SPECS else []
        missing = [jit_function(k).__name__ for k in launched if all(s[0] is not k for s in specs)]
        if missing:
            print(f"FAIL {mod_info.name}: no AOT spec for {missing}")
            failed += 1
        for i, (kernel, signature, constexprs, options) in enumerate(specs):
            fn = jit_function(kernel)
            name = f"{mod_info.name}.{fn.__name__}[{i}]"
            try:
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                    target=GPUTarget("cuda", 90, 32),
                    options=options,
                )
                if not compiled.asm["ptx"]:
                    raise RuntimeError("no PTX")
                if compiled.metadata.shared > SM90_MAX_SHARED:  # would raise OutOfResources at launch
                    raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory, "
                                       f"sm_90 allows {SM90_MAX_SHARED}: {constexprs}")
                print(f"ok   {name}")
            except Exception:
                failed += 1
                print(f"FAIL {name}\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tuple(sys.argv[1:])))
