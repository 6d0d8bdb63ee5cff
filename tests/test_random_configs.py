"""Random combinations of shapes and options against the float64 references.

The other tests take each option through chosen cases; these draw a fresh combination per case
from the test's seed (``FFMOE_SEED`` replays one): shapes down to N=0 and E=1, top_k up to E,
every activation, ``gemm`` and routing option, capacity, recompute. float64 on both sides, so the
kernels (the interpreter on CPU) must match the reference in the output, the routing counts and
every gradient to 1e-9 relative.
"""

import random

import pytest
import torch
from moe_cases import assert_close, check_against_reference, fused_and_reference, random_moe

TOL64 = 1e-9
GEMMS = ("auto", "grouped", "gathered", "fused_dgrad", "bmm")


def _draw_shape(rng: random.Random) -> tuple[int, int, int, int]:
    return (rng.choice([0, 1, 2, 7, 33]), rng.choice([1, 8, 24]), rng.choice([1, 5, 16]),
            rng.choice([1, 2, 3, 8, 12]))


def _draw_routing(rng: random.Random, E: int, K: int) -> dict:
    options = dict(score_func=rng.choice(["softmax", "sigmoid"]), norm_topk_prob=rng.random() < 0.5)
    if rng.random() < 0.3:
        options["routed_scaling_factor"] = rng.choice([0.5, 2.5])
    if rng.random() < 0.3:
        options["expert_bias"] = 0.1 * torch.randn(E, dtype=torch.float64)
    groups = [g for g in range(2, E + 1) if E % g == 0]
    if groups and rng.random() < 0.4:
        n_group = rng.choice(groups)
        topk_group = rng.randint(1, n_group)
        if topk_group * (E // n_group) >= K:
            options.update(n_group=n_group, topk_group=topk_group)
    if rng.random() < 0.3:
        options["capacity_factor"] = rng.choice([0.5, 1.0, 1.5])
    return options


@pytest.mark.parametrize("case", range(24))
def test_fused_moe_random_config(case):
    rng = random.Random(f"{int(torch.randint(2**31, ()))}-{case}")  # cases differ under one FFMOE_SEED
    N, D, F, E = _draw_shape(rng)
    K = rng.randint(1, E)
    options = dict(activation=rng.choice(["swiglu", "geglu", "relu2"]), gemm=rng.choice(GEMMS),
                   recompute=rng.random() < 0.3, **_draw_routing(rng, E, K))
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
    rng = random.Random(f"{int(torch.randint(2**31, ()))}-{case}")  # cases differ under one FFMOE_SEED
    N, D, F, E = _draw_shape(rng)
    K = rng.randint(1, 2 * E)  # ids drawn with repeats: a row may name an expert twice
    ids = torch.randint(0, E, (N, K), dtype=rng.choice([torch.int32, torch.int64]))
    weights = torch.rand(N, K, dtype=torch.float64)
    activation, gemm = rng.choice(["swiglu", "geglu", "relu2"]), rng.choice(GEMMS)
    recompute = rng.random() < 0.3
    x, _, w_up, w_down = random_moe(N, D, F, E)
    what = f"N={N} D={D} F={F} E={E} K={K} {activation} {gemm} recompute={recompute}"
    check_against_reference(x, ids, weights, w_up, w_down, TOL64, what, activation=activation, gemm=gemm,
                            recompute=recompute)
