"""glu_forward / glu_backward against float64 torch (autograd for the derivative).

Each test runs the Triton kernel (the interpreter on CPU) and the torch fallback.
"""

import math

import pytest
import torch

from flashfusemoe.kernels import activation

ACTS = ["swiglu", "geglu", "relu2"]
DTYPES = [torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(activation, "use_triton", lambda t: False)
    return request.param


def ref_act(g, name):
    if name == "swiglu":
        return g / (1 + torch.exp(-g))
    if name == "geglu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2.0)))
    return torch.clamp(g, min=0) ** 2


def ref_glu(h64, name):
    f = h64.shape[1] // 2
    return ref_act(h64[:, :f], name) * h64[:, f:]


# Tolerances (relative to the expected value, plus a small absolute floor):
# - fp64: a handful of fp64 roundings, and exp/erf accurate to a few ulp.
# - fp32: the same in fp32 (eps 6e-8); cancellation in d(silu) = s*(1 + g*(1-s)) costs
#   absolute error of a few eps times |g|, |u|, |da| (all O(1..10) here), hence atol 1e-5.
# - bf16: inputs are exact in fp32, the fp32 math is as above, and the bf16 output rounding
#   (truncation in the interpreter) is below one ulp, 2^-7 relative.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0**-7, 1e-5)}


def make_h(r, f, dtype, device):
    return (2 * torch.randn(r, 2 * f, dtype=torch.float64)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_glu_forward(backend, device, dtype, act):
    r, f = 45, 300  # f spans several column blocks, the last one partial
    h = make_h(r, f, dtype, device)
    a = activation.glu_forward(h, act)
    assert a.dtype == dtype and a.shape == (r, f)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.cpu().double(), ref_glu(h.cpu().double(), act), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_forward_h_copy(backend, device, dtype):
    h = make_h(45, 300, dtype, device)
    h_copy = torch.full_like(h, float("nan"))
    a = activation.glu_forward(h, "swiglu", h_copy=h_copy)
    assert torch.equal(h_copy, h)  # every element, bit for bit
    assert torch.equal(a, activation.glu_forward(h, "swiglu"))  # the copy changes nothing else
    empty = torch.empty(0, 600, dtype=dtype, device=device)
    assert activation.glu_forward(empty, "swiglu", h_copy=empty.clone()).shape == (0, 300)


def test_glu_forward_bad_h_copy(backend, device):
    h = make_h(8, 16, torch.float32, device)
    for bad in (torch.empty(8, 16, device=device), torch.empty(8, 32, dtype=torch.float64, device=device),
                torch.empty(32, 8, device=device).t()):
        with pytest.raises(ValueError, match="h_copy must be a contiguous"):
            activation.glu_forward(h, "swiglu", h_copy=bad)


def make_backward_inputs(r, f, n, k, dtype, device):
    h = make_h(r, f, dtype, device)
    da = torch.randn(r, f, dtype=torch.float64).to(dtype).to(device)
    # Rows map to distinct assignments; about a third are unused (-1) and hold garbage.
    row_to_assign = torch.randperm(n * k)[:r].to(torch.int32)
    row_to_assign[torch.rand(r) < 0.35] = -1
    row_to_assign[0] = -1
    row_to_assign = row_to_assign.to(device)
    invalid = row_to_assign < 0
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype, device=device)
    pick = torch.randint(0, 3, (r, 2 * f), device=device)
    h = torch.where(invalid[:, None], garbage[pick], h)
    da = torch.where(invalid[:, None], garbage[pick[:, :f]], da)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    topk_weights = torch.rand(n, k, dtype=wdt, device=device)
    return h, da, row_to_assign, topk_weights


def ref_backward(h, da, act, row_to_assign, topk_weights):
    valid = (row_to_assign >= 0).cpu()
    idx = row_to_assign.cpu().long().clamp(min=0)
    w = torch.where(valid, topk_weights.cpu().double().reshape(-1)[idx], 0.0)[:, None]
    h64 = torch.where(valid[:, None], h.cpu().double(), 0.0).requires_grad_(True)
    da64 = torch.where(valid[:, None], da.cpu().double(), 0.0)
    a = ref_glu(h64, act)
    (dh,) = torch.autograd.grad(a, h64, grad_outputs=w * da64)
    a = a.detach()
    return dh, w * a, (da64 * a).sum(1), (da64 * a).abs().sum(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_glu_backward(backend, device, dtype, act):
    r, f, n, k = 45, 300, 30, 2
    h, da, row_to_assign, topk_weights = make_backward_inputs(r, f, n, k, dtype, device)
    dh, a_weighted, grad_w_row = activation.glu_backward(h, da, act, row_to_assign, topk_weights)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert dh.dtype == dtype and dh.shape == (r, 2 * f)
    assert a_weighted.dtype == dtype and a_weighted.shape == (r, f)
    assert grad_w_row.dtype == cdt and grad_w_row.shape == (r,)

    want_dh, want_aw, want_gw, abs_terms = ref_backward(h, da, act, row_to_assign, topk_weights)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(dh.cpu().double(), want_dh, rtol=rtol, atol=atol)
    torch.testing.assert_close(a_weighted.cpu().double(), want_aw, rtol=rtol, atol=atol)
    # grad_w_row sums F terms computed in fp32 (fp64) from exact inputs: each term is off by
    # a few eps (act, two products), and the sum is a tree over 128-wide blocks (7 levels)
    # plus 3 block additions (torch.sum is pairwise too), so its error stays below
    # 16 eps * sum_f |da * a|.
    eps = torch.finfo(cdt).eps
    err = (grad_w_row.cpu().double() - want_gw).abs()
    assert bool((err <= 16 * eps * abs_terms).all()), err.max()

    # Unused rows hold NaN/inf: their outputs must be exact zeros.
    invalid = (row_to_assign < 0).cpu()
    assert bool((dh.cpu()[invalid] == 0).all())
    assert bool((a_weighted.cpu()[invalid] == 0).all())
    assert bool((grad_w_row.cpu()[invalid] == 0).all())


def test_glu_backward_writes_a_weighted_into_a_given_buffer(backend, device):
    h, da, row_to_assign, topk_weights = make_backward_inputs(45, 300, 30, 2, torch.float32, device)
    want = activation.glu_backward(h, da, "geglu", row_to_assign, topk_weights)
    out = torch.full((45, 300), float("nan"), device=device)
    got = activation.glu_backward(h, da, "geglu", row_to_assign, topk_weights, a_weighted_out=out)
    assert got[1] is out
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="a_weighted_out must be a contiguous \\(45, 300\\)"):
        activation.glu_backward(h, da, "geglu", row_to_assign, topk_weights, a_weighted_out=out[:, :299])


def test_empty_and_bad_activation(backend, device):
    h = torch.randn(0, 16, device=device)
    assert activation.glu_forward(h, "swiglu").shape == (0, 8)
    dh, aw, gw = activation.glu_backward(
        h,
        h[:, :8],
        "geglu",
        torch.zeros(0, dtype=torch.int32, device=device),
        torch.rand(0, 2, device=device),
    )
    assert dh.shape == (0, 16) and aw.shape == (0, 8) and gw.shape == (0,)
    with pytest.raises(ValueError):
        activation.glu_forward(torch.randn(2, 4, device=device), "gelu")
