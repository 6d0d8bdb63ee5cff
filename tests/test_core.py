"""``core.forward``/``core.backward`` with ``into=``: results written in place change nothing.

The JAX bridge passes its output buffers, so the core writes ``out``, ``h``, the routing outputs,
the layout maps and every gradient straight into them (bf16 weight gradients through the TMA
kernel, fp32 ones copied).
"""

import pytest
import torch

from flashfusemoe import core
from flashfusemoe.config import MoEOptions
from flashfusemoe.functional import make_plan
from tests.moe_cases import random_moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_into_writes_in_place_and_changes_nothing(device, gemm, dtype):
    x, router_weight, w_up, w_down = random_moe(40, 16, 8, 4, dtype=dtype, device=device)
    opts = MoEOptions(top_k=2, gemm=gemm)
    plan = make_plan(opts, x, router_weight, w_up, w_down, None)
    grad_out = torch.randn_like(x)
    outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan)
    grads = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                          plan)

    results = (*outputs, *residuals)
    into = [torch.full_like(r, -7) for r in results]  # every buffer garbage-filled
    outputs2, residuals2, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan, into=into)
    in_place = {i for i, r in enumerate((*outputs2, *residuals2)) if r.data_ptr() == into[i].data_ptr()}
    # out, h, and the routing outputs on every path; the dropless layout's maps too
    assert in_place >= ({0, 1, 4, 5, 9} | ({2, 3, 6, 7, 8} if gemm == "grouped" else set()))
    for got, want in zip((*outputs2, *residuals2), results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    into = [torch.full_like(g, float("nan")) for g in grads]
    grads2 = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                           plan, into=into)
    assert all(got is dst for got, dst in zip(grads2, into, strict=True))
    for got, want in zip(grads2, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_into_skips_destinations_that_do_not_fit(device):
    x, router_weight, w_up, w_down = random_moe(12, 16, 8, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, gemm="grouped")
    plan = make_plan(opts, x, router_weight, w_up, w_down, None)
    into = [None] * 10
    into[0] = torch.empty(12, 16, dtype=torch.float64, device=device)  # wrong dtype
    into[9] = torch.empty(16, 24, device=device).t()  # [24, 16]: wrong shape (and not contiguous)
    outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan, into=into)
    assert outputs.out is not into[0] and residuals.h is not into[9]
    assert outputs.out.dtype == torch.float32 and residuals.h.shape == (24, 16)
