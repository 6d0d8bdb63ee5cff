"""fused_moe against the independent moe_reference: output and every gradient, float64 on CPU.

Tolerance: both sides compute in float64 and differ only in summation order, so relative
errors are ~1e-14; 1e-9 leaves room for reordering yet catches any real bug (a wrong
expert, weight or derivative shows up at >= 1e-3).
"""

import pytest
import torch
from moe_cases import assert_close, far_from_ties, fused_and_reference, random_moe, rel_err

import flashfusemoe
from flashfusemoe.kernels import activation, gathered_gemm, grouped_gemm, permute, routing
from flashfusemoe.reference import moe_reference

TOL64 = 1e-9


@pytest.mark.parametrize("act", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
@pytest.mark.parametrize("recompute", [False, True])
def test_matches_reference(act, gemm, recompute):
    tensors = random_moe(N=48, D=32, F=24, E=6, dtype=torch.float64)
    fused, ref = fused_and_reference(tensors, top_k=2, activation=act, gemm=gemm, recompute=recompute)
    assert_close(fused, ref, TOL64, f"{act}/{gemm}/recompute={recompute}")


def test_leading_dims_and_gemm_auto():
    tensors = random_moe(N=None, D=16, F=8, E=4, lead_shape=(2, 3))
    fused, ref = fused_and_reference(tensors, top_k=2)
    assert fused[0].shape == (2, 3, 16)
    assert_close(fused, ref, TOL64)


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_capacity_drops_are_counted_and_consistent(gemm):
    tensors = random_moe(N=40, D=16, F=8, E=4)
    x, router_weight, w_up, w_down = tensors
    router_weight[0] += 2.0 * x.mean(0)  # overload expert 0 so capacity must drop
    fused, ref = fused_and_reference(tensors, top_k=2, capacity_factor=0.5, gemm=gemm, return_aux=True)
    assert_close(fused, ref, TOL64, f"capacity/{gemm}")
    dropped = int(fused[1]["dropped_tokens"])
    assert dropped > 0 and dropped == int(ref[1]["dropped_tokens"])
    assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long())


def test_bmm_overflow_grows_not_drops():
    tensors = random_moe(N=32, D=16, F=8, E=4)
    tensors[1][1] += 3.0 * tensors[0].mean(0)  # expert 1 gets far more than the padded size
    fused, ref = fused_and_reference(tensors, top_k=2, gemm="bmm", max_tokens_per_expert=2, return_aux=True)
    assert int(fused[1]["dropped_tokens"]) == 0
    assert_close(fused, ref, TOL64, "bmm overflow")


def _one_expert_router(x, E, winner, losers=()):
    """Expert ``winner`` leads every token's logits by ~5 and each of ``losers`` trails by ~5: the
    winner takes every token and the losers none, whatever the top-k, while the softmax weights stay
    away from saturation (at a lead of ~50 the router gradient is ~1e-20 and the comparison only
    measures float64 round-off)."""
    router_weight = 0.01 * torch.randn(E, x.shape[1], dtype=x.dtype)
    direction = x.mean(0) / x.mean(0).norm() ** 2
    router_weight[winner] = 5.0 * direction
    for e in losers:
        router_weight[e] = -5.0 * direction
    return router_weight


@pytest.mark.parametrize(
    "options",
    [dict(gemm="grouped"), dict(gemm="bmm"), dict(gemm="bmm", max_tokens_per_expert=4),
     dict(gemm="grouped", capacity_factor=1.0), dict(gemm="bmm", capacity_factor=1.0)],
    ids=["grouped", "bmm", "bmm-overflowing", "capacity-grouped", "capacity-bmm"],
)
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert_and_empty_experts(options, top_k):
    N, E, winner, losers = 24, 6, 3, (0, 5)
    x, _, w_up, w_down = random_moe(N=N, D=16, F=8, E=E)
    x = x.abs() + 0.5  # a shared direction, so one expert wins every token
    router_weight = _one_expert_router(x, E, winner, losers)
    fused, ref = fused_and_reference((x, router_weight, w_up, w_down), top_k=top_k, **options,
                                     norm_topk_prob=top_k > 1, return_aux=True)
    counts = fused[1]["tokens_per_expert"]
    assert int(counts[winner]) == N and all(int(counts[e]) == 0 for e in losers)
    assert torch.equal(counts.long(), ref[1]["tokens_per_expert"].long())
    dropped = int(fused[1]["dropped_tokens"])
    if "capacity_factor" in options:  # each expert keeps `capacity` of its assignments
        capacity = -(-N * top_k // E)
        assert dropped == int((counts.long() - capacity).clamp(min=0).sum()) == int(ref[1]["dropped_tokens"])
        assert dropped >= N - capacity
    else:
        assert dropped == 0
    assert_close(fused, ref, TOL64, f"one expert {options}")
    for e in losers:  # an empty expert's weight gradients are exactly zero
        assert torch.count_nonzero(fused[2][2][e]) == 0 and torch.count_nonzero(fused[2][3][e]) == 0


@pytest.mark.parametrize(
    "top_k,E,copies,always_chosen,never_chosen",
    [
        # experts 0 and 3 always tie, so do 1 and 2: the one slot goes to 0 or 1
        (1, 4, {3: 0, 2: 1}, (), (2, 3)),
        # 1 and 2 tie: whether or not expert 0 leads, the tied pair's slot goes to 1
        (2, 3, {2: 1}, (1,), ()),
        # the leading pair takes two slots, and the trailing pair's lower index the third
        (3, 4, {3: 0, 2: 1}, (0, 1), ()),
    ],
    ids=["top1", "top2-boundary", "top3-boundary"],
)
def test_ties_pick_lower_index(top_k, E, copies, always_chosen, never_chosen):
    N = 16
    x, router_weight, w_up, w_down = random_moe(N=N, D=16, F=8, E=E)
    for copy, original in copies.items():
        router_weight[copy] = router_weight[original]
    # norm_topk_prob=False with top_k=1: normalised weights are all 1 and the router gradient vanishes
    fused, ref = fused_and_reference((x, router_weight, w_up, w_down), top_k=top_k, norm_topk_prob=top_k > 1,
                                     return_aux=True)
    counts = fused[1]["tokens_per_expert"]
    assert all(int(counts[e]) == N for e in always_chosen), counts
    assert all(int(counts[e]) == 0 for e in never_chosen), counts
    assert torch.equal(counts.long(), ref[1]["tokens_per_expert"].long())
    assert_close(fused, ref, TOL64, "ties")


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_capacity_ties_keep_the_lower_token(gemm):
    """Identical tokens route identically with equal weights: capacity keeps the first ones."""
    N, E, top_k, capacity_factor = 12, 4, 2, 0.5
    x, router_weight, w_up, w_down = random_moe(N=N, D=16, F=8, E=E)
    x = x[:1].expand(N, -1).clone()
    fused, ref = fused_and_reference((x, router_weight, w_up, w_down), top_k=top_k, gemm=gemm,
                                     capacity_factor=capacity_factor, return_aux=True)
    capacity = -(-int(capacity_factor * N * top_k) // E)
    assert int(fused[1]["dropped_tokens"]) == top_k * (N - capacity) == int(ref[1]["dropped_tokens"])
    out = fused[0]
    assert torch.count_nonzero(out[capacity:]) == 0  # every later token lost both its experts
    assert torch.count_nonzero(out[:capacity].abs().sum(1)) == capacity
    assert_close(fused, ref, TOL64, f"capacity ties {gemm}")


def test_topk_equals_num_experts_with_capacity_and_groups():
    tensors = random_moe(N=20, D=16, F=8, E=4)
    for options in (dict(capacity_factor=0.5), dict(n_group=2, topk_group=2),
                    dict(score_func="sigmoid", n_group=2, topk_group=2, capacity_factor=0.75)):
        fused, ref = fused_and_reference(tensors, top_k=4, return_aux=True, **options)
        assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long())
        assert int(fused[1]["dropped_tokens"]) == int(ref[1]["dropped_tokens"])
        assert_close(fused, ref, TOL64, f"top_k=E {options}")


def test_expert_bias_gets_no_gradient():
    """The bias steers selection only: a bias that requires grad gets none, and x and the weights
    get the reference's gradients."""
    x, router_weight, w_up, w_down = random_moe(N=24, D=16, F=8, E=4)
    bias = (0.5 * torch.randn(4, dtype=torch.float64)).requires_grad_(True)
    out = flashfusemoe.fused_moe(x, router_weight, w_up, w_down, 2, expert_bias=bias)
    out.sum().backward()
    assert bias.grad is None or torch.count_nonzero(bias.grad) == 0
    fused, ref = fused_and_reference((x, router_weight, w_up, w_down), top_k=2, expert_bias=bias.detach())
    assert_close(fused, ref, TOL64, "bias")


@pytest.mark.parametrize(
    "N,D,F,E,top_k",
    [(1, 16, 8, 4, 2), (7, 37, 5, 3, 3), (9, 16, 8, 1, 1), (12, 24, 8, 5, 5), (5, 8, 4, 8, 1)],
    ids=["N=1", "odd-D-F-topk=E", "E=1", "topk=E", "more-experts-than-tokens"],
)
@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_edge_shapes(N, D, F, E, top_k, gemm):
    tensors = random_moe(N=N, D=D, F=F, E=E)
    # top_k=1 with normalised weights has a zero router gradient: test the unnormalised one there
    fused, ref = fused_and_reference(tensors, top_k=top_k, gemm=gemm, norm_topk_prob=top_k > 1)
    assert_close(fused, ref, TOL64, f"N={N} D={D} F={F} E={E} top_k={top_k}")


@pytest.mark.parametrize(
    "options",
    [dict(gemm="grouped"), dict(gemm="bmm"), dict(gemm="bmm", max_tokens_per_expert=8),
     dict(gemm="grouped", capacity_factor=1.0), dict(gemm="bmm", capacity_factor=1.0)],
    ids=["grouped", "bmm", "bmm-max8", "capacity-grouped", "capacity-bmm"],
)
def test_zero_tokens(options):
    x, router_weight, w_up, w_down = random_moe(N=0, D=16, F=8, E=4)
    leaves = [t.clone().requires_grad_(True) for t in (x, router_weight, w_up, w_down)]
    out, aux = flashfusemoe.fused_moe(*leaves, 2, **options, return_aux=True)
    assert out.shape == (0, 16)
    (out.sum() + aux["load_balance_loss"] + aux["z_loss"]).backward()
    for t in leaves[1:]:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0
    assert int(aux["dropped_tokens"]) == 0 and int(aux["tokens_per_expert"].sum()) == 0
    fused, ref = fused_and_reference((x, router_weight, w_up, w_down), top_k=2, **options, return_aux=True)
    assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long())
    assert_close(fused, ref, TOL64, f"N=0 {options}")


@pytest.mark.parametrize("triton", [True, False], ids=["kernels", "torch-path"])
@pytest.mark.parametrize(
    "options",
    [dict(gemm="grouped"), dict(gemm="bmm"), dict(gemm="grouped", capacity_factor=1.0),
     dict(gemm="bmm", capacity_factor=1.0)],
    ids=["grouped", "bmm", "capacity-grouped", "capacity-bmm"],
)
def test_nan_token_stays_in_its_row(options, triton, monkeypatch):
    """A token whose scores are all NaN still picks K real experts (its row is NaN); before, the
    routing kernel gave it expert id E, which corrupted other rows or failed an index check."""
    if not triton:
        for module in (activation, gathered_gemm, grouped_gemm, permute, routing):
            monkeypatch.setattr(module, "use_triton", lambda t: False)
    x, r, u, d = random_moe(N=12, D=8, F=4, E=4)
    x[1, 3] = float("nan")
    out, aux = flashfusemoe.fused_moe(x, r, u, d, 2, **options, return_aux=True)
    assert torch.isnan(out[1]).all()
    assert int(aux["tokens_per_expert"].sum()) == 12 * 2  # every assignment went to a real expert
    others = [i for i in range(12) if i != 1]
    if "capacity_factor" in options:  # which assignments a NaN weight displaces is not specified
        assert torch.isfinite(out[others]).all()
    else:
        assert rel_err(out[others], moe_reference(x, r, u, d, 2)[others]) < TOL64


@pytest.mark.parametrize("aux_key", ["load_balance_loss", "z_loss"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_loss_values_and_gradients(aux_key, score_func):
    tensors = random_moe(N=32, D=16, F=8, E=4)
    fused, ref = fused_and_reference(tensors, top_k=2, score_func=score_func, aux_key=aux_key)
    assert rel_err(fused[1][aux_key].detach(), ref[1][aux_key].detach()) < TOL64
    grads_f, grads_r = fused[2], ref[2]
    assert rel_err(grads_f[1], grads_r[1]) < TOL64  # router weight
    assert rel_err(grads_f[0], grads_r[0]) < TOL64  # x, through the router
    assert torch.count_nonzero(grads_f[1]) > 0


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_gradcheck(gemm):
    x, router_weight, w_up, w_down = far_from_ties(N=6, D=8, F=4, E=4, top_k=2)
    leaves = [t.clone().requires_grad_(True) for t in (x, router_weight, w_up, w_down)]
    fn = lambda *ts: flashfusemoe.fused_moe(*ts, 2, gemm=gemm)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_plain_torch_path_without_triton(monkeypatch):
    """CPU tensors without the interpreter run torch fallbacks; they must match too."""
    for module in (activation, gathered_gemm, grouped_gemm, permute, routing):
        monkeypatch.setattr(module, "use_triton", lambda t: False)
    for gemm in ("grouped", "gathered", "fused_dgrad", "bmm"):
        tensors = random_moe(N=40, D=16, F=8, E=5)
        fused, ref = fused_and_reference(tensors, top_k=2, gemm=gemm, capacity_factor=0.8)
        assert_close(fused, ref, TOL64, f"torch path {gemm}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """fp32/bf16 runs against a float64 reference on the same (rounded) inputs.

    fp32: GEMMs in fp32 -> ~1e-6; bf16: operands and stored intermediates rounded to bf16
    (8 bits of mantissa, ~4e-3 each) -> a few 1e-2 worst-case after two GEMMs.
    """
    tensors = [t.to(dtype) for t in random_moe(N=32, D=32, F=16, E=4)]
    fused, ref = fused_and_reference(tensors, top_k=2, ref_dtype=torch.float64)
    assert fused[0].dtype == dtype
    assert_close(fused, ref, 1e-5 if dtype == torch.float32 else 5e-2, str(dtype))


@pytest.mark.parametrize("gemm", ["gathered", "fused_dgrad"])
@pytest.mark.parametrize("routing", ["capacity", "one-expert"])
def test_gathered_float32_adversarial_routing(routing, gemm):
    """The gathered / fused-dgrad kernels (interpreted on CPU) in float32 against a float64
    reference: capacity drops (rows without an assignment), and every token on one expert (the
    others empty)."""
    x, router_weight, w_up, w_down = random_moe(N=40, D=32, F=16, E=6)
    if routing == "capacity":
        router_weight[0] += 2.0 * x.mean(0)
        top_k, options = 2, dict(capacity_factor=0.5)
    else:  # tokens in one orthant: each one's projection on the mean direction is about 1
        x = x.abs() + 0.5
        router_weight = _one_expert_router(x, 6, winner=4, losers=(0, 1))
        top_k, options = 1, dict(norm_topk_prob=False)
    tensors = [t.float() for t in (x, router_weight, w_up, w_down)]
    options["gemm"] = gemm
    fused, ref = fused_and_reference(tensors, top_k, ref_dtype=torch.float64, return_aux=True, **options)
    assert_close(fused, ref, 1e-5, routing)
    if routing == "capacity":
        assert int(fused[1]["dropped_tokens"]) > 0
    else:
        assert fused[1]["tokens_per_expert"].tolist() == [0, 0, 0, 0, 40, 0]


def _loads_around(mean: int, E: int) -> torch.Tensor:
    """E loads averaging exactly ``mean``, some of them at the mean, shuffled."""
    half = torch.randint(-3, 4, (E // 2,))
    half[0] = 0
    return (mean + torch.cat([half, -half]))[torch.randperm(E)]


def _sign_rule(loads: torch.Tensor) -> list[int]:
    """The direction of each expert's step, in exact integer arithmetic."""
    values = [int(v) for v in loads.tolist()]
    total, E = sum(values), len(values)
    return [(total > E * v) - (total < E * v) for v in values]


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loads_dtype, mean", [(torch.int32, 5), (torch.int64, 5), (torch.float32, 5),
                                               (torch.int64, 2**40)])  # 2**40: exact beyond float32
def test_update_expert_bias_follows_the_sign_rule(bias_dtype, loads_dtype, mean):
    E, rate = 16, 0.0375
    loads = _loads_around(mean, E).to(loads_dtype)
    direction = _sign_rule(loads)
    assert 0 in direction and 1 in direction and -1 in direction  # every branch is exercised
    bias = torch.randn(E, dtype=bias_dtype)
    before = bias.clone()
    result = flashfusemoe.update_expert_bias(bias, loads, rate)
    assert result is bias  # in place
    assert torch.equal(bias, before + rate * torch.tensor(direction, dtype=bias_dtype))


@pytest.mark.parametrize("bias, loads, rate, exc, match", [
    ([0.0, 0.0], torch.ones(2), 0.1, TypeError, "expert_bias must be a torch.Tensor"),
    (torch.zeros(2), [1, 2], 0.1, TypeError, "tokens_per_expert must be a torch.Tensor"),
    (torch.zeros(2, dtype=torch.bfloat16), torch.ones(2), 0.1, TypeError,
     "expert_bias must be float32 or float64"),
    (torch.zeros(2, 2), torch.ones(2, 2), 0.1, ValueError, r"expert_bias must be \[E\]"),
    (torch.zeros(0), torch.ones(0), 0.1, ValueError, r"expert_bias must be \[E\] with E >= 1"),
    (torch.zeros(3), torch.ones(2), 0.1, ValueError, r"tokens_per_expert must be \[E=3\]"),
    (torch.zeros(2), torch.ones(2, dtype=torch.bool), 0.1, TypeError,
     "tokens_per_expert must be integer or floating"),
    (torch.zeros(2), torch.ones(2), 0.0, ValueError, "rate=0.0 must be a finite number > 0"),
    (torch.zeros(2), torch.ones(2), -0.1, ValueError, "rate=-0.1 must be a finite number > 0"),
    (torch.zeros(2), torch.ones(2), float("nan"), ValueError, "rate=nan must be a finite number > 0"),
    (torch.zeros(2), torch.ones(2), True, TypeError, "rate must be a float, got bool"),
    (torch.zeros(2), torch.ones(2), "0.1", TypeError, "rate must be a float, got str"),
])
def test_update_expert_bias_rejects_bad_arguments(bias, loads, rate, exc, match):
    before = bias.clone() if isinstance(bias, torch.Tensor) else None
    with pytest.raises(exc, match=match):
        flashfusemoe.update_expert_bias(bias, loads, rate)
    if before is not None:
        assert torch.equal(bias, before)  # nothing changed
