"""tests/fast_interpreter.py: installed in an interpreted test session, and kernels that call
helpers still compute the right thing and leave ``triton.language`` as it was."""

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="kernels compile here")


@triton.jit
def _row_sums_kernel(x_ptr, out_ptr, D: tl.constexpr):
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * D + tl.arange(0, D))
    tl.store(out_ptr + row, tl.sum(x, axis=0) + tl.max(x, axis=0))  # two helper calls per program


def test_installed_and_kernels_with_helpers_agree():
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "skips_redundant", False), "not installed on this Triton"
    assert getattr(interpreter._get_np_dtype, "cached", False), "type caches not installed on this Triton"
    assert getattr(tl.tensor.__init__, "shares_shapes", False), "tensor shapes not shared on this Triton"
    x = torch.randn(5, 16)
    out = torch.empty(5)
    for _ in range(2):  # the second launch finds the language restored, patches it again
        _row_sums_kernel[(5,)](x, out, 16)
        torch.testing.assert_close(out, x.sum(1) + x.amax(1))
        assert tl.core.is_builtin(tl.program_id), "triton.language stayed patched after the launch"


@triton.jit
def _mixed_dtypes_kernel(a_ptr, b_ptr, shift_ptr, out_ptr, D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, D)
    a = tl.load(a_ptr + row * D + cols).to(tl.float32)
    b = tl.load(b_ptr + row * D + cols).to(tl.float32)
    shift = tl.load(shift_ptr + row).to(tl.float32)
    tl.store(out_ptr + row * D + cols, a * b + shift)


def test_shared_types_keep_dtypes_apart():
    """bf16, fp16, int64 and float32 blocks of one shape in one kernel (the type caches key on the
    element type and the shape), twice, against torch."""
    a = torch.randn(4, 8).bfloat16()
    b = torch.randn(4, 8).half()
    shift = torch.arange(4)
    out = torch.empty(4, 8)
    for _ in range(2):
        _mixed_dtypes_kernel[(4,)](a, b, shift, out, 8)
        torch.testing.assert_close(out, a.float() * b.float() + shift[:, None].float())
