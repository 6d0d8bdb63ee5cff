"""fused_moe against the independent moe_reference: output and every gradient, float64 on CPU.

Tolerance: both sides compute in float64 and differ only in summation order, so relative
errors are ~1e-14; 1e-9 leaves room for reordering yet catches any real bug (a wrong
expert, weight or derivative shows up at >= 1e-3).
"""

import pytest
import torch
from moe_cases import assert_close, fused_and_reference, random_moe, rel_err

import flashfusemoe
from flashfusemoe.kernels import activation, grouped_gemm, permute, routing

TOL64 = 1e-9


@pytest.mark.parametrize("act", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
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


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
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


def _one_expert_router(x, E, winner):
    """Expert `winner` leads every token's logits by ~5: it wins them all, while its softmax
    weight stays away from saturation (at a lead of ~50 the router gradient is ~1e-20 and the
    comparison only measures float64 round-off)."""
    router_weight = 0.01 * torch.randn(E, x.shape[1], dtype=x.dtype)
    router_weight[winner] = 5.0 * x.mean(0) / x.mean(0).norm() ** 2
    return router_weight


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert_and_empty_experts(gemm, top_k):
    x, _, w_up, w_down = random_moe(N=24, D=16, F=8, E=6)
    x = x.abs() + 0.5  # a shared direction, so one expert wins every token
    router_weight = _one_expert_router(x, 6, winner=3)
    fused, ref = fused_and_reference((x, router_weight, w_up, w_down), top_k=top_k, gemm=gemm,
                                     norm_topk_prob=top_k > 1, return_aux=True)
    assert int(fused[1]["tokens_per_expert"][3]) == 24
    assert_close(fused, ref, TOL64, "one expert")
    counts = fused[1]["tokens_per_expert"]
    for e in range(6):
        if counts[e] == 0:  # an empty expert's weight gradients are exactly zero
            assert torch.count_nonzero(fused[2][2][e]) == 0 and torch.count_nonzero(fused[2][3][e]) == 0


def test_ties_pick_lower_index():
    x, router_weight, w_up, w_down = random_moe(N=16, D=16, F=8, E=4)
    router_weight[2] = router_weight[1]  # experts 1 and 2 always tie
    router_weight[3] = router_weight[0]  # so do 0 and 3
    # norm_topk_prob=False: with top_k=1 normalised weights are all 1 and the router gradient vanishes
    fused, ref = fused_and_reference((x, router_weight, w_up, w_down), top_k=1, norm_topk_prob=False,
                                     return_aux=True)
    counts = fused[1]["tokens_per_expert"]
    assert counts[2] == 0 and counts[3] == 0
    assert torch.equal(counts.long(), ref[1]["tokens_per_expert"].long())
    assert_close(fused, ref, TOL64, "ties")


@pytest.mark.parametrize(
    "N,D,F,E,top_k",
    [(1, 16, 8, 4, 2), (7, 37, 5, 3, 3), (9, 16, 8, 1, 1), (12, 24, 8, 5, 5), (5, 8, 4, 8, 1)],
    ids=["N=1", "odd-D-F-topk=E", "E=1", "topk=E", "more-experts-than-tokens"],
)
@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_edge_shapes(N, D, F, E, top_k, gemm):
    tensors = random_moe(N=N, D=D, F=F, E=E)
    # top_k=1 with normalised weights has a zero router gradient: test the unnormalised one there
    fused, ref = fused_and_reference(tensors, top_k=top_k, gemm=gemm, norm_topk_prob=top_k > 1)
    assert_close(fused, ref, TOL64, f"N={N} D={D} F={F} E={E} top_k={top_k}")


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_zero_tokens(gemm):
    x, router_weight, w_up, w_down = random_moe(N=0, D=16, F=8, E=4)
    leaves = [t.clone().requires_grad_(True) for t in (x, router_weight, w_up, w_down)]
    out, aux = flashfusemoe.fused_moe(*leaves, 2, gemm=gemm, return_aux=True)
    assert out.shape == (0, 16)
    (out.sum() + aux["load_balance_loss"] + aux["z_loss"]).backward()
    for t in leaves[1:]:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0
    assert int(aux["dropped_tokens"]) == 0 and int(aux["tokens_per_expert"].sum()) == 0


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


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_gradcheck(gemm):
    x, router_weight, w_up, w_down = random_moe(N=6, D=8, F=4, E=4)
    leaves = [t.clone().requires_grad_(True) for t in (x, router_weight, w_up, w_down)]
    fn = lambda *ts: flashfusemoe.fused_moe(*ts, 2, gemm=gemm)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_plain_torch_path_without_triton(monkeypatch):
    """CPU tensors without the interpreter run torch fallbacks; they must match too."""
    for module in (activation, grouped_gemm, permute, routing):
        monkeypatch.setattr(module, "use_triton", lambda t: False)
    for gemm in ("grouped", "bmm"):
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
