"""Every routing option through the fused path against moe_reference, float64 on CPU.

Output, gradients of x, router and every expert weight, and the gradient of each aux loss
alone. Tolerance as in test_functional: float64 on both sides, 1e-9 relative.
"""


import pytest
import torch
from moe_cases import assert_close, far_from_ties, fused_and_reference, random_moe, rel_err

import flashfusemoe

TOL64 = 1e-9

VARIANTS = {
    "softmax": dict(),
    "softmax-no-norm": dict(norm_topk_prob=False),
    "softmax-bias": dict(expert_bias="random"),
    "sigmoid": dict(score_func="sigmoid"),
    "sigmoid-no-norm-scaled": dict(score_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5),
    "sigmoid-bias-groups": dict(score_func="sigmoid", expert_bias="random", n_group=4, topk_group=2,
                                routed_scaling_factor=1.5),
    "softmax-groups": dict(n_group=2, topk_group=1),
    "groups-of-one": dict(n_group=8, topk_group=3),
    "capacity-softmax": dict(capacity_factor=0.6),
    "capacity-sigmoid-bias": dict(score_func="sigmoid", expert_bias="random", capacity_factor=0.7),
}


def _options(name, E, dtype=torch.float64, device="cpu"):
    options = dict(VARIANTS[name])
    if options.get("expert_bias") == "random":
        options["expert_bias"] = 0.1 * torch.randn(E, dtype=dtype, device=device)
    return options


# "cuda": the Triton kernels on the GPU in float64 (on a GPU machine "cpu" runs the torch path)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_reference(variant, gemm, dev):
    tensors = random_moe(N=40, D=16, F=8, E=8, device=dev)
    fused, ref = fused_and_reference(tensors, top_k=3, gemm=gemm, return_aux=True,
                                     **_options(variant, 8, device=dev))
    assert_close(fused, ref, TOL64, variant)
    assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long())
    assert int(fused[1]["dropped_tokens"]) == int(ref[1]["dropped_tokens"])
    if "capacity" in variant:
        assert int(fused[1]["dropped_tokens"]) > 0


@pytest.mark.parametrize("aux_key", ["load_balance_loss", "z_loss"])
@pytest.mark.parametrize("variant", ["softmax", "sigmoid-bias-groups", "capacity-sigmoid-bias"])
def test_aux_loss_gradients(variant, aux_key):
    tensors = random_moe(N=32, D=16, F=8, E=8)
    fused, ref = fused_and_reference(tensors, top_k=2, aux_key=aux_key, **_options(variant, 8))
    assert rel_err(fused[1][aux_key].detach(), ref[1][aux_key].detach()) < TOL64
    for i in range(4):
        assert rel_err(fused[2][i], ref[2][i]) < TOL64, (variant, aux_key, i)
    assert torch.count_nonzero(fused[2][1]) > 0


# Finite differences on a subset: every variant's gradients already equal the autograd reference's
# (test_variant_matches_reference); these four cover no-norm + scaling, sigmoid, bias, groups, capacity.
@pytest.mark.parametrize("variant", ["softmax", "sigmoid-no-norm-scaled", "sigmoid-bias-groups",
                                     "capacity-sigmoid-bias"])
def test_gradcheck_variant(variant):
    options = _options(variant, 8)
    x, r, u, d = far_from_ties(N=6, D=8, F=4, E=8, top_k=2, options=options)
    leaves = [t.clone().requires_grad_(True) for t in (x, r, u, d)]

    def fn(*ts):
        out, aux = flashfusemoe.fused_moe(*ts, 2, return_aux=True, **options)
        return out, aux["load_balance_loss"], aux["z_loss"]

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ties_identical_selection_with_bias_and_groups():
    x, r, u, d = random_moe(N=24, D=16, F=8, E=8)
    r[1] = r[0]
    r[5] = r[4]
    options = dict(score_func="sigmoid", expert_bias=torch.zeros(8, dtype=torch.float64), n_group=4,
                   topk_group=2)
    fused, ref = fused_and_reference((x, r, u, d), top_k=2, return_aux=True, **options)
    assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long())
    assert_close(fused, ref, TOL64, "ties with groups")


def test_expert_bias_changes_selection_not_weights():
    x, r, u, d = random_moe(N=32, D=16, F=8, E=4)
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # forces expert 0 into every top-2
    _, aux = flashfusemoe.fused_moe(x, r, u, d, 2, expert_bias=bias, return_aux=True)
    assert int(aux["tokens_per_expert"][0]) == 32
    fused, ref = fused_and_reference((x, r, u, d), top_k=2, expert_bias=bias)
    assert_close(fused, ref, TOL64, "bias")


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_group=3, topk_group=1), "n_group=3"),
    (dict(n_group=4, topk_group=5), "topk_group=5"),
    (dict(n_group=8, topk_group=1), "top_k=2 exceeds"),
    (dict(expert_bias=torch.zeros(8, dtype=torch.float64)), "expert_bias"),
    (dict(expert_bias=torch.zeros(4, dtype=torch.float16)), "float16"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor=nan"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
])
def test_bad_routing_options(kwargs, match):
    x, r, u, d = random_moe(N=4, D=8, F=4, E=4) if "n_group" not in kwargs else random_moe(N=4, D=8, F=4, E=8)
    with pytest.raises((ValueError, TypeError), match=match):
        flashfusemoe.fused_moe(x, r, u, d, 2, **kwargs)
