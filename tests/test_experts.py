"""``moe_experts``: the fused experts on given routing, against an independent float64 loop.

The tensors live on CUDA when there is a GPU (the reference loop always runs on CPU in float64), else on CPU
with the real Triton kernels under the interpreter.
"""

import math

import pytest
import torch
from moe_cases import check_against_reference, experts_reference, grads_of, rel_err

import flashfusemoe
from flashfusemoe import CapacityOverflowError, moe_experts
from flashfusemoe.experts import experts_forward_op, experts_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(N, D, F_, E, K, dtype, ids=None, weights=None):
    x = torch.randn(N, D, dtype=dtype, device=DEVICE)
    w_up = torch.randn(E, 2 * F_, D, dtype=dtype, device=DEVICE) / math.sqrt(D)
    w_down = torch.randn(E, D, F_, dtype=dtype, device=DEVICE) / math.sqrt(F_)
    if ids is None:
        rows = [torch.randperm(E)[:K] for _ in range(N)]
        ids = torch.stack(rows) if N else torch.zeros(0, K, dtype=torch.long)
    if weights is None:
        weights = torch.rand(N, K, dtype=dtype, device=DEVICE)
    return x, ids.to(DEVICE), weights, w_up, w_down


def _ids(rows):
    return torch.tensor(rows, dtype=torch.long, device=DEVICE)


# Routing patterns on E=6 experts: (N, K, ids or None for random distinct ids)
ROUTINGS = {
    "random": (24, 2, None),
    "one_expert_takes_all": (12, 1, _ids([[3]] * 12)),
    "empty_experts": (10, 2, _ids([[0, 1], [1, 0]] * 5)),
    "top_k_equals_E": (5, 6, None),
    "repeated_ids_in_a_row": (6, 3, _ids([[2, 2, 2], [0, 0, 5], [5, 1, 5], [4, 3, 2], [1, 1, 0], [0, 5, 0]])),
    "more_slots_than_experts": (3, 8, _ids([[0, 1, 2, 3, 4, 5, 0, 0], [5] * 8, [1, 2] * 4])),
    "N1": (1, 2, None),
    "N0": (0, 2, None),
}


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_float64_matches_reference(routing, gemm):
    N, K, ids = ROUTINGS[routing]
    x, ids, weights, w_up, w_down = problem(N, 16, 8, 6, K, torch.float64, ids=ids)
    check_against_reference(x, ids, weights, w_up, w_down, 1e-12, gemm=gemm)


DISTINCT = [r for r in ROUTINGS if r not in ("repeated_ids_in_a_row", "more_slots_than_experts")]


@pytest.mark.parametrize("routing", DISTINCT)
def test_distinct_ids_layout_matches_reference_and_the_general_layout(routing):
    """distinct_ids=True (one-launch layout and gather) against the loop, and bit-equal to the default."""
    N, K, ids = ROUTINGS[routing]
    x, ids, weights, w_up, w_down = problem(N, 16, 8, 6, K, torch.float64, ids=ids)
    grads = check_against_reference(x, ids, weights, w_up, w_down, 1e-12, distinct_ids=True)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    fast = grads_of(lambda *a: moe_experts(*a, distinct_ids=True), x, ids, weights, w_up, w_down, grad_out)
    general = grads_of(moe_experts, x, ids, weights, w_up, w_down, grad_out)
    for f, g in zip((fast[0], *fast[1]), (general[0], *general[1])):
        assert torch.equal(f, g)
    assert len(grads) == 4


def test_distinct_ids_float32_kernels():
    x, ids, weights, w_up, w_down = problem(40, 32, 16, 8, 3, torch.float32)
    check_against_reference(x, ids, weights, w_up, w_down, 2e-5, distinct_ids=True)


def test_distinct_ids_refuses_a_repeat():
    x, ids, weights, w_up, w_down = problem(6, 16, 8, 6, 3, torch.float64)
    ids[4, 2] = ids[4, 0]
    with pytest.raises(ValueError, match=r"topk_ids row 4 repeats an expert .* distinct_ids=True"):
        moe_experts(x, ids, weights, w_up, w_down, distinct_ids=True)
    if DEVICE == "cpu":  # (on CUDA a device-side assert would end the process's CUDA context)
        with pytest.raises(RuntimeError, match=r"topk_ids repeats an expert in a row"):
            moe_experts(x, ids, weights, w_up, w_down, distinct_ids=True, check_ids=False)


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("routing", ["random", "repeated_ids_in_a_row"])
def test_float32_kernels_match_reference(routing, activation, gemm):
    N, K, ids = ROUTINGS[routing]
    x, ids, weights, w_up, w_down = problem(N, 32, 16, 6, K, torch.float32, ids=ids)
    check_against_reference(x, ids, weights, w_up, w_down, 2e-5, activation=activation, gemm=gemm)


def test_auto_resolves_by_expert_width_and_d_model():
    """"auto" runs "gathered" up to GATHERED_MAX_FFN, above it "fused_dgrad" up to
    FUSED_DGRAD_MAX_D_MODEL and "grouped" beyond, as fused_moe does."""
    from flashfusemoe.config import FUSED_DGRAD_MAX_D_MODEL, GATHERED_MAX_FFN

    f_big, d_big = GATHERED_MAX_FFN + 1, FUSED_DGRAD_MAX_D_MODEL + 8
    for d, f, expected in ((8, GATHERED_MAX_FFN, "gathered"), (d_big, GATHERED_MAX_FFN, "gathered"),
                           (FUSED_DGRAD_MAX_D_MODEL, f_big, "fused_dgrad"), (d_big, f_big, "grouped")):
        x, ids, weights, w_up, w_down = (t.to("meta") for t in problem(4, 8, 1, 3, 2, torch.float32))
        x, w_up, w_down = x.new_empty(4, d), w_up.new_empty(3, 2 * f, d), w_down.new_empty(3, d, f)
        _, plan = experts_plan(x, ids, weights, w_up, w_down, activation="swiglu", gemm="auto",
                               recompute=False, check_ids=False)
        assert plan.gemm == expected, (d, f)


def test_repeated_weights_and_int32_ids_and_recompute():
    x, ids, _, w_up, w_down = problem(16, 16, 8, 4, 2, torch.float64)
    weights = torch.full((16, 2), 0.5, dtype=torch.float64, device=DEVICE)  # ties everywhere
    check_against_reference(x, ids.int(), weights, w_up, w_down, 1e-12, recompute=True)


def test_repeated_id_equals_summed_weight():
    x, _, _, w_up, w_down = problem(5, 16, 8, 4, 2, torch.float64)
    f64 = {"dtype": torch.float64, "device": DEVICE}
    twice = moe_experts(x, _ids([[1, 1]] * 5), torch.tensor([[0.25, 0.5]] * 5, **f64), w_up, w_down)
    once = moe_experts(x, _ids([[1]] * 5), torch.tensor([[0.75]] * 5, **f64), w_up, w_down)
    assert rel_err(twice, once) < 1e-14


def test_weights_of_another_dtype():
    """fp32 routing weights (a router run in fp32) with fp64 activations: the gradient keeps fp32."""
    x, ids, weights, w_up, w_down = problem(12, 16, 8, 4, 2, torch.float64)
    grads = check_against_reference(x, ids, weights.float(), w_up, w_down, 1e-6)
    assert grads[1].dtype == torch.float32


def test_empty_experts_get_exact_zero_gradients():
    x, ids, weights, w_up, w_down = problem(8, 16, 8, 5, 2, torch.float32, ids=_ids([[0, 2]] * 8))
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    _, grads = grads_of(moe_experts, x, ids, weights, w_up, w_down, grad_out)
    for e in (1, 3, 4):
        assert torch.equal(grads[2][e], torch.zeros_like(grads[2][e]))
        assert torch.equal(grads[3][e], torch.zeros_like(grads[3][e]))


def test_bmm_grows_when_an_expert_overflows_and_raises_in_a_trace():
    # One expert takes every assignment: far above the padded layout's 2x mean load.
    x, ids, weights, w_up, w_down = problem(16, 16, 8, 8, 1, torch.float64, ids=_ids([[5]] * 16))
    check_against_reference(x, ids, weights, w_up, w_down, 1e-12, gemm="bmm")
    with pytest.raises(CapacityOverflowError):
        experts_forward_op(x, ids, weights, w_up, w_down, "swiglu", False, "bmm", 4, False, True, False)


def test_bmm_max_tokens_per_expert_sizes_the_padded_layout():
    # Expert 5 takes 12 of 16 assignments: room for 12 rows needs no growth, even in a trace.
    ids = _ids([[5, 1]] * 6 + [[5, 2]] * 6 + [[3, 4]] * 4)
    x, ids, weights, w_up, w_down = problem(16, 16, 8, 8, 2, torch.float64, ids=ids)
    _, plan = experts_plan(x, ids, weights, w_up, w_down, activation="swiglu", gemm="bmm", recompute=False,
                           check_ids=True, max_tokens_per_expert=12)
    assert plan.rows_per_expert == 12
    check_against_reference(x, ids, weights, w_up, w_down, 1e-12, gemm="bmm", max_tokens_per_expert=12)
    out = experts_forward_op(x, ids, weights, w_up, w_down, "swiglu", False, "bmm", 12, False, True, False)[0]
    torch.testing.assert_close(out, moe_experts(x, ids, weights, w_up, w_down, gemm="grouped"), rtol=1e-12,
                               atol=1e-12)
    # Too small: eager grows it (same result), a trace raises.
    check_against_reference(x, ids, weights, w_up, w_down, 1e-12, gemm="bmm", max_tokens_per_expert=3)
    with pytest.raises(CapacityOverflowError):
        experts_forward_op(x, ids, weights, w_up, w_down, "swiglu", False, "bmm", 11, False, True, False)


@pytest.mark.parametrize("bad", [-1, 6, 1 << 40])
def test_out_of_range_ids_raise(bad):
    x, ids, weights, w_up, w_down = problem(4, 16, 8, 6, 2, torch.float64)
    ids[2, 1] = bad
    with pytest.raises(ValueError, match=rf"topk_ids .*\[0, num_experts=6\).*got {bad} at \[2, 1\]"):
        moe_experts(x, ids, weights, w_up, w_down)
    if DEVICE == "cuda":
        return  # a device-side assert would end the process's CUDA context
    # Without the host check the device-side assert still refuses (RuntimeError on CPU).
    with pytest.raises(RuntimeError, match=r"topk_ids has an expert id outside \[0, 6\)"):
        moe_experts(x, ids, weights, w_up, w_down, check_ids=False)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "topk_ids": a["topk_ids"].float()}, TypeError, "topk_ids must be int32 or int64"),
        (lambda a: {**a, "topk_ids": a["topk_ids"].short()}, TypeError, "topk_ids must be int32 or int64"),
        (lambda a: {**a, "topk_ids": a["topk_ids"][:, 0]}, ValueError, "topk_ids must have rank 2"),
        (lambda a: {**a, "topk_ids": a["topk_ids"][:3]}, ValueError, r"topk_ids must be \[N=4, K\]"),
        (lambda a: {**a, "topk_ids": a["topk_ids"][:, :0]}, ValueError,
         r"topk_ids must be \[N=4, K\] with K >= 1"),
        (lambda a: {**a, "topk_weights": a["topk_weights"][:, :1]}, ValueError,
         r"topk_weights must be \[N=4, K=2\]"),
        (lambda a: {**a, "topk_weights": a["topk_weights"].long()}, TypeError,
         "topk_weights must have a floating"),
        (lambda a: {**a, "topk_weights": [[0.5, 0.5]] * 4}, TypeError, "topk_weights must be a torch.Tensor"),
        (lambda a: {**a, "x": a["x"][None]}, ValueError, r"x must be \[N, D\]"),
        (lambda a: {**a, "w_up": a["w_up"][:, :15]}, ValueError, "w_up must have an even number"),
        (lambda a: {**a, "w_down": a["w_down"][:, :, :4]}, ValueError, r"w_down must be \[E=6, D=16, F=8\]"),
        (lambda a: {**a, "w_up": a["w_up"].float()}, TypeError, "w_up has dtype torch.float32 but x has"),
        (lambda a: {**a, "x": a["x"].to("meta")}, ValueError, r"topk_ids is on \S+ but x is on meta"),
        (lambda a: {k: t.to("meta") for k, t in a.items()}, ValueError, "x is on the meta device"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match):
    x, ids, weights, w_up, w_down = problem(4, 16, 8, 6, 2, torch.float64)
    args = change({"x": x, "topk_ids": ids, "topk_weights": weights, "w_up": w_up, "w_down": w_down})
    with pytest.raises(error, match=match):
        moe_experts(args["x"], args["topk_ids"], args["topk_weights"], args["w_up"], args["w_down"])


@pytest.mark.parametrize("kw, match", [({"activation": "gelu"}, "activation='gelu'"),
                                       ({"gemm": "dense"}, "gemm="),
                                       ({"check_ids": 1}, "check_ids must be a bool"),
                                       ({"distinct_ids": None}, "distinct_ids must be a bool"),
                                       ({"max_tokens_per_expert": 0}, "max_tokens_per_expert=0 must be >= 1"),
                                       ({"max_tokens_per_expert": 2.0}, "max_tokens_per_expert must be an"),
                                       ({"max_tokens_per_expert": 4, "gemm": "grouped"},
                                        "max_tokens_per_expert=4 sizes the padded layout of gemm='bmm'")])
def test_bad_options(kw, match):
    x, ids, weights, w_up, w_down = problem(4, 16, 8, 6, 2, torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        moe_experts(x, ids, weights, w_up, w_down, **kw)


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_opcheck(gemm):
    x, ids, weights, w_up, w_down = (t.requires_grad_(t.is_floating_point())
                                     for t in problem(8, 16, 8, 4, 2, torch.float64))
    rows = 8 if gemm == "bmm" else 0
    args = (x, ids, weights, w_up, w_down, "swiglu", False, gemm, rows, False, True, gemm != "bmm")
    torch.library.opcheck(experts_forward_op, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, ids, weights, w_up, w_down = problem(12, 16, 8, 4, 2, torch.float64)
    params = [t.requires_grad_(True) for t in (weights, w_up, w_down)]

    def loss_fn(x, ids, weights, w_up, w_down):
        return (moe_experts(torch.tanh(x), ids, weights.softmax(-1), w_up, w_down) ** 2).mean()

    eager = loss_fn(x, ids, *params)
    grads_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss_fn, fullgraph=True)(x, ids, *params)
    grads_compiled = torch.autograd.grad(compiled, params)
    assert rel_err(compiled.detach(), eager.detach()) < 1e-12
    for ge, gc in zip(grads_eager, grads_compiled):
        assert rel_err(gc, ge) < 1e-9


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad"])
@pytest.mark.parametrize("routing", ["random", "one_expert_takes_all", "repeated_ids_in_a_row"])
def test_bfloat16_on_gpu(routing, gemm):
    """bf16 on the GPU kernels (torch._grouped_mm): within bf16 rounding of the float64 loop."""
    N, K, ids = ROUTINGS[routing]
    x, ids, weights, w_up, w_down = problem(N * 32, 256, 128, 6, K, torch.bfloat16,
                                            ids=None if ids is None else ids.repeat(32, 1))
    check_against_reference(x, ids, weights.float(), w_up, w_down, 2e-2, gemm=gemm)


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_autocast_float32_weights_get_float32_gradients(gemm):
    """fp16 autocast with float32 expert weights: every gradient against the float64 loop on the
    fp16-rounded operands, the weights' in float32 (the Triton kernels' accumulator, not a 16-bit
    gradient widened afterwards), eager and compiled alike."""
    x, ids, weights, w_up, w_down = problem(24, 16, 8, 4, 2, torch.float32)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    rounded = [t.half().double().cpu() for t in (x, weights, w_up, w_down)]
    _, ref = grads_of(experts_reference, rounded[0], ids.cpu(), *rounded[1:], grad_out)
    device = "cuda" if x.is_cuda else "cpu"
    runs = []
    for fn in (moe_experts, torch.compile(moe_experts, backend="aot_eager", fullgraph=True)):
        with torch.autocast(device, dtype=torch.float16):
            _, grads = grads_of(lambda *a, fn=fn: fn(*a, gemm=gemm), x, ids, weights, w_up, w_down, grad_out)
        for name, g, r in zip(("x", "topk_weights", "w_up", "w_down"), grads, ref, strict=True):
            assert g.dtype == torch.float32, name
            assert rel_err(g, r) < 5e-3, name
        runs.append(grads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    if gemm != "bmm" and (x.is_cuda or flashfusemoe.kernels.INTERPRET):
        for g in runs[0][2:]:
            assert not torch.equal(g, g.half().float())


def test_autocast_casts_states_and_expert_weights():
    x, ids, weights, w_up, w_down = problem(12, 16, 8, 4, 2, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = moe_experts(x, ids, weights, w_up, w_down)
    expected = moe_experts(x.bfloat16(), ids, weights, w_up.bfloat16(), w_down.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
