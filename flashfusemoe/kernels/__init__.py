"""Triton kernels, one module per kernel family.

Every public wrapper here takes torch tensors and dispatches:
- CUDA tensors, or any tensor when ``TRITON_INTERPRET=1``: the Triton kernel;
- CPU tensors otherwise: a plain torch implementation of the same function.

Each module lists its kernels in ``AOT_SPECS`` (kernel, signature, constexprs) so that
``tests/kernels/test_aot.py`` can compile every kernel for sm_90 on a CPU machine.
"""

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through a Triton kernel rather than the torch fallback."""
    return t.is_cuda or INTERPRET


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
