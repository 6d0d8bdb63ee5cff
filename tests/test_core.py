"""``core.forward``/``core.backward``: the ``on_ready`` hook reports final results.

The JAX bridge copies a reported result out at once, while later kernels run, so a result
changed after its report would reach JAX stale.
"""

import pytest
import torch

from flashfusemoe import core
from flashfusemoe.config import MoEOptions
from flashfusemoe.functional import make_plan
from tests.moe_cases import random_moe


def _recorder():
    seen = {}

    def on_ready(indices, tensors):
        for i, t in zip(indices, tensors, strict=True):
            if i in seen:
                raise AssertionError(f"result {i} reported twice")
            seen[i] = t.clone()

    return seen, on_ready


def _assert_unchanged(seen: dict, results) -> None:
    for i, snapshot in seen.items():
        torch.testing.assert_close(results[i], snapshot, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, i=i: f"result {i} changed after its report: {m}")


@pytest.mark.parametrize(
    "options",
    [
        {"gemm": "grouped"},
        {"gemm": "bmm"},
        {"gemm": "bmm", "max_tokens_per_expert": 4},  # overflows: the layout grows after routing
        {"gemm": "grouped", "capacity_factor": 0.5},
        {"gemm": "grouped", "recompute": True},
    ],
    ids=["grouped", "bmm", "bmm-grows", "capacity", "recompute"],
)
def test_on_ready_reports_final_results(device, options):
    x, router_weight, w_up, w_down = random_moe(40, 16, 8, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, **options)
    plan = make_plan(opts, x, router_weight, w_up, w_down, None)
    seen, on_ready = _recorder()
    outputs, residuals, plan = core.forward(x, router_weight, w_up, w_down, None, opts, plan, allow_grow=True,
                                            on_ready=on_ready)
    results = (*outputs, *residuals)
    expected = set(range(1, 9)) | (set() if opts.recompute else {9})
    assert set(seen) == expected  # routing, layout and h early; out only at the end
    _assert_unchanged(seen, results)

    seen, on_ready = _recorder()
    grads = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, torch.randn_like(x),
                          None, opts, plan, on_ready=on_ready)
    assert set(seen) == {2, 3}  # the expert weight gradients
    _assert_unchanged(seen, grads)


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_into_writes_in_place_and_changes_nothing(device, gemm):
    x, router_weight, w_up, w_down = random_moe(40, 16, 8, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, gemm=gemm)
    plan = make_plan(opts, x, router_weight, w_up, w_down, None)
    grad_out = torch.randn_like(x)
    outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan)
    grads = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                          plan)

    results = (*outputs, *residuals)
    into = [None] * len(results)
    into[0], into[9] = torch.full_like(results[0], float("nan")), torch.full_like(results[9], float("nan"))
    outputs2, residuals2, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan, into=into)
    assert outputs2.out is into[0] and residuals2.h is into[9]
    for got, want in zip((*outputs2, *residuals2), results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    into = [torch.full_like(g, float("nan")) for g in grads[:2]] + [None, None]
    grads2 = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                           plan, into=into)
    assert grads2[0] is into[0] and grads2[1] is into[1]
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
