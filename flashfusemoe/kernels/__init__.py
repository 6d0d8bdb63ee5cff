"""Triton kernels, one module per kernel family.

Every public wrapper here takes torch tensors and dispatches:
- CUDA tensors, or any tensor when ``TRITON_INTERPRET=1``: the Triton kernel;
- CPU tensors otherwise: a plain torch implementation of the same function.

Each module lists its kernels in ``AOT_SPECS`` (kernel, signature, constexprs) so that
``tests/kernels/test_aot.py`` can compile every kernel for sm_90 on a CPU machine.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERP = tl.constexpr(INTERPRET)  # the same, for branches inside kernels


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through a Triton kernel rather than the torch fallback."""
    return t.is_cuda or INTERPRET


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and routing dtype for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_blocks(width: int, target: int, max_block: int) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS)`` of a row-wise kernel: columns up to ``max_block`` wide (a power
    of two), rows to make about ``target`` elements per program."""
    block_cols = min(triton.next_power_of_2(max(width, 1)), max_block)
    return max(1, target // block_cols), block_cols


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
