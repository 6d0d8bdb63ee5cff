"""Test set-up. Runs before any flashfusemoe module is imported.

Without a CUDA device the Triton kernels run for real on CPU tensors through Triton's
interpreter, so ``TRITON_INTERPRET`` must be set before ``@triton.jit`` reads it at import.
"""

import os

import torch
from cpu_subprocess import with_xla_flags

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # XLA on CPU compiles every tiny test program with LLVM at -O2: 0.28 s per compile against
    # 0.06 s at -O0 (measured), the larger part of the JAX tests' time. Subprocesses inherit it.
    os.environ["XLA_FLAGS"] = with_xla_flags(os.environ, "--xla_backend_optimization_level=0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import fast_interpreter  # noqa: E402
import pytest  # noqa: E402

fast_interpreter.install()

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh, reported seed per test: inputs are random but a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little") if "FFMOE_SEED" not in os.environ else int(
        os.environ["FFMOE_SEED"]
    )
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"\n[seed] rerun with FFMOE_SEED={seed}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
        if rep.failed:
            rep.sections.append(("seed", f"FFMOE_SEED={dict(item.user_properties).get('seed')}"))
