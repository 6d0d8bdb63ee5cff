"""MoELayer: parameters, shared expert, routing statistics, calibration, autocast."""

import pytest
import torch
from moe_cases import rel_err

import flashfusemoe
from flashfusemoe.layer import glu_mlp
from flashfusemoe.reference import moe_reference


def _reference_of(layer, x, **extra):
    shared = {}
    if layer.shared_ffn_dim:
        shared = dict(shared_w_up=layer.shared_w_up, shared_w_down=layer.shared_w_down,
                      shared_gate_weight=layer.shared_gate_weight)
    o = layer.options
    return moe_reference(x, layer.router_weight, layer.w_up, layer.w_down, o.top_k,
                         activation=o.activation, score_func=o.score_func,
                         norm_topk_prob=o.norm_topk_prob, expert_bias=layer.expert_bias,
                         n_group=o.n_group, topk_group=o.topk_group,
                         routed_scaling_factor=o.routed_scaling_factor, capacity_factor=o.capacity_factor,
                         **shared, **extra)


@pytest.mark.parametrize("gate", [False, True])
def test_layer_with_shared_expert_matches_reference(gate):
    layer = flashfusemoe.MoELayer(16, 8, 4, 2, num_shared_experts=1, shared_ffn_dim=12,
                                  shared_expert_gate=gate, dtype=torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out = layer(x)
    ref = _reference_of(layer, x)
    assert rel_err(out, ref) < 1e-9
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    grads_ref = torch.autograd.grad(ref.square().sum(), list(layer.parameters()))
    for (name, _), g, gr in zip(layer.named_parameters(), grads, grads_ref):
        assert rel_err(g, gr) < 1e-9, name


def test_parameter_layouts_and_init_scale():
    layer = flashfusemoe.MoELayer(32, 24, 6, 2)
    assert layer.router_weight.shape == (6, 32)
    assert layer.w_up.shape == (6, 48, 32)
    assert layer.w_down.shape == (6, 32, 24)
    bound = 1 / 32 ** 0.5
    assert layer.w_up.abs().max() <= bound and layer.w_up.abs().max() > 0.9 * bound


def test_routing_stats_without_sync():
    layer = flashfusemoe.MoELayer(16, 8, 4, 2, capacity_factor=0.5, dtype=torch.float64)
    layer.accumulate_routing_stats = True
    x = torch.randn(20, 16, dtype=torch.float64)
    layer(x)
    layer(x)
    stats = layer.last_routing_stats
    assert int(stats["tokens_per_expert"].sum()) == 40
    loads = stats["tokens_per_expert"].double()
    assert abs(float(stats["load_cv"]) - float(loads.std(correction=0) / loads.mean())) < 1e-12
    assert int(layer.accumulated_loads.sum()) == 80
    assert int(layer.accumulated_dropped) == 2 * int(stats["dropped_tokens"])


def test_calibrate_max_tokens_covers_the_peak():
    torch.manual_seed(0)
    layer = flashfusemoe.MoELayer(16, 8, 4, 2, dtype=torch.float64)
    batches = [torch.randn(30, 16, dtype=torch.float64) for _ in range(3)]
    m = flashfusemoe.calibrate_max_tokens(batches, layer.router_weight, 2, margin=0.0, multiple=1)
    peak = 0
    for b in batches:
        _, aux = flashfusemoe.fused_moe(b, layer.router_weight, layer.w_up, layer.w_down, 2, return_aux=True)
        peak = max(peak, int(aux["tokens_per_expert"].max()))
    assert m == peak
    with pytest.raises(ValueError, match="margin"):
        flashfusemoe.calibrate_max_tokens(batches, layer.router_weight, 2, margin=-1)


def test_autocast_bf16_cpu():
    layer = flashfusemoe.MoELayer(32, 16, 4, 2)
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # The float64 run takes the same bf16-rounded operands: from unrounded ones, a token whose two
    # best logits are closer than bf16's rounding would be routed differently (seen in CI).
    operands = (x, layer.router_weight, layer.w_up, layer.w_down)
    exact = flashfusemoe.fused_moe(*(t.detach().bfloat16().double() for t in operands), 2)
    assert rel_err(out, exact) < 5e-2  # bf16 intermediates: ~4e-3 per rounding, two GEMMs


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_autocast_float32_weights_get_float32_gradients(gemm):
    """fp32 master weights under fp16 autocast: every gradient against a float64 reference on the
    fp16-rounded operands, the weight gradients in float32. The Triton weight-gradient kernels
    (grouped, gathered) store their float32 accumulator, not a 16-bit gradient widened afterwards."""
    layer = flashfusemoe.MoELayer(32, 16, 4, 2, gemm=gemm)
    x = torch.randn(24, 32, requires_grad=True)
    grad_out = torch.randn(24, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x)
    assert out.dtype == torch.float16
    out.float().backward(grad_out)
    leaves = (x, layer.router_weight, layer.w_up, layer.w_down)
    exact = [t.detach().half().double().requires_grad_(True) for t in leaves]
    moe_reference(*exact, 2).backward(grad_out.half().double())
    for name, leaf, ref in zip(("x", "router_weight", "w_up", "w_down"), leaves, exact, strict=True):
        assert leaf.grad.dtype == torch.float32, name
        assert rel_err(leaf.grad, ref.grad) < 5e-3, name  # fp16 intermediates: ~5e-4 per rounding
    if gemm != "bmm" and flashfusemoe.kernels.INTERPRET:  # torch.bmm's gradient is an fp16 one copied
        for w in (layer.w_up, layer.w_down):
            assert not torch.equal(w.grad, w.grad.half().float())


def test_autocast_mixed_dtypes_cpu():
    """Under autocast x and the weights may differ in dtype (all are cast): a bf16 activation into an
    fp32 layer is the usual case, and used to raise a dtype-mismatch TypeError."""
    layer = flashfusemoe.MoELayer(32, 16, 4, 2, num_shared_experts=1)
    x = torch.randn(16, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        mixed = flashfusemoe.fused_moe(x, layer.router_weight, layer.w_up.bfloat16(), layer.w_down, 2)
    assert out.dtype == mixed.dtype == torch.bfloat16
    weights = [t.detach().bfloat16() for t in (layer.router_weight, layer.w_up, layer.w_down)]
    routed = flashfusemoe.fused_moe(x, *weights, 2)
    assert torch.equal(mixed, routed)
    shared = glu_mlp(x, layer.shared_w_up.detach().bfloat16(), layer.shared_w_down.detach().bfloat16(),
                     "swiglu")
    assert rel_err(out, routed + shared) < 1e-2


def _skewed_layer(E: int, K: int, N: int, D: int = 16):
    """A float64 layer whose router prefers expert 0 for almost every token, and the tokens."""
    layer = flashfusemoe.MoELayer(D, 8, E, K, use_expert_bias=True, dtype=torch.float64)
    shared = torch.randn(D, dtype=torch.float64)
    shared /= shared.norm()
    x = torch.randn(N, D, dtype=torch.float64) + 2 * shared
    with torch.no_grad():
        layer.router_weight.normal_(0, 0.3)
        layer.router_weight[0] = 3 * shared
    return layer, x


def test_update_expert_bias_balances_a_skewed_router():
    """Aux-loss-free balancing: expert 0 starts with most tokens (3.5-4x the mean load); after 20
    updates the loads of the next 10 steps average at most 2.5x the mean on their largest expert
    (1.3-1.8x over 30 seeds; the opposite sign keeps 3.7-4x)."""
    E, K, N = 8, 2, 64
    layer, x = _skewed_layer(E, K, N)
    mean, loads = N * K / E, torch.zeros(E)
    with torch.no_grad():
        layer(x)
        assert int(layer.last_routing_stats["tokens_per_expert"][0]) >= 0.75 * N
        for step in range(30):
            layer.update_expert_bias(0.05)
            layer(x)
            if step >= 20:
                loads += layer.last_routing_stats["tokens_per_expert"]
    assert float(loads.max()) / 10 <= 2.5 * mean, loads / 10
    assert float(layer.expert_bias[0]) < 0 < float(layer.expert_bias[1:].max())


def test_update_expert_bias_uses_the_accumulated_loads_and_resets_them():
    """Two calls, 6 tokens on expert 0 then 2 on expert 1: the sum [6, 2, 0, 0] steps expert 0 down,
    leaves expert 1 (at the mean) and raises 2 and 3; the last call alone would raise expert 0."""
    layer = flashfusemoe.MoELayer(4, 8, 4, 1, use_expert_bias=True, dtype=torch.float64)
    with torch.no_grad():
        layer.router_weight.copy_(torch.eye(4, dtype=torch.float64) * torch.tensor([[1.0], [1.0], [0], [0]]))
    layer.accumulate_routing_stats = True
    eye = torch.eye(4, dtype=torch.float64)
    layer(eye[0].repeat(6, 1))
    layer(eye[1].repeat(2, 1))
    assert layer.last_routing_stats["tokens_per_expert"].tolist() == [0, 2, 0, 0]
    layer.update_expert_bias(0.5)
    assert layer.expert_bias.tolist() == [-0.5, 0.0, 0.5, 0.5]
    assert int(layer.accumulated_loads.abs().sum()) == 0 and int(layer.accumulated_dropped) == 0
    layer.update_expert_bias(0.5)  # nothing seen since: no load above or below the mean
    assert layer.expert_bias.tolist() == [-0.5, 0.0, 0.5, 0.5]
    layer.accumulate_routing_stats = False  # the last call's loads [0, 2, 0, 0]
    layer.update_expert_bias(0.5)
    assert layer.expert_bias.tolist() == [0.0, -0.5, 1.0, 1.0]


def test_update_expert_bias_errors():
    with pytest.raises(ValueError, match="use_expert_bias=True"):
        flashfusemoe.MoELayer(16, 8, 4, 2).update_expert_bias(0.1)
    layer = flashfusemoe.MoELayer(16, 8, 4, 2, use_expert_bias=True)
    with pytest.raises(ValueError, match="no loads yet"):
        layer.update_expert_bias(0.1)
    with pytest.raises(ValueError, match="rate=0 must be a finite number > 0"):
        layer.update_expert_bias(0)
