"""Random combinations of shapes and options against the float64 references.

The other tests take each option through chosen cases; these draw a fresh combination per case
from the test's seed (``FFMOE_SEED`` replays one): shapes down to N=0 and E=1, top_k up to E,
every activation, ``gemm`` and routing option, capacity, recompute. float64 on both sides, so the
kernels (the interpreter on CPU) must match the reference in the output, the routing counts and
every gradient to 1e-9 relative.
"""

import pytest
import torch
from moe_cases import (
    assert_close,
    case_rng,
    check_against_reference,
    draw_experts_config,
    draw_moe_config,
    fused_and_reference,
    random_moe,
)

TOL64 = 1e-9


@pytest.mark.parametrize("case", range(24))
def test_fused_moe_random_config(case):
    (N, D, F, E, K), options = draw_moe_config(case_rng(case), torch.float64)
    what = f"N={N} D={D} F={F} E={E} K={K} {options}"
    fused, ref = fused_and_reference(random_moe(N, D, F, E), K, return_aux=True, **options)
    if K == 1 and options["norm_topk_prob"]:
        # Every routing weight is exactly 1 (times the scaling): the router's gradient is zero, and
        # both sides return float64 residue of cancelling terms. Check it is residue, then set it aside.
        scale = max(float(g.abs().max()) for g in ref[2][:1] + ref[2][2:]) if N else 1.0
        for result in (fused, ref):
            assert float(result[2][1].abs().max()) <= 1e-12 * scale, what
            result[2][1] = torch.zeros_like(result[2][1])
    assert_close(fused, ref, TOL64, what)
    assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long()), what
    assert int(fused[1]["dropped_tokens"]) == int(ref[1]["dropped_tokens"]), what


@pytest.mark.parametrize("case", range(8))
def test_moe_experts_random_config(case):
    (N, D, F, E, K), ids, options = draw_experts_config(case_rng(case))
    x, _, w_up, w_down = random_moe(N, D, F, E)
    weights = torch.rand(N, K, dtype=torch.float64)
    check_against_reference(x, ids, weights, w_up, w_down, TOL64, f"N={N} D={D} F={F} E={E} K={K} {options}",
                            **options)
