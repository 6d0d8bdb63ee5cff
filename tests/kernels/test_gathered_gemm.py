"""Gathered expert GEMMs (token rows read by index in the GEMM, GLU in the epilogues).

References are float64 torch computations that gather each row's token and each row's expert
weight explicitly (no expert slicing, no library code): ``x[tok[r]] @ w[expert_of_row[r]].T``,
the GLU and its derivative written out, weight gradients through a one-hot expert matrix.
"""

import math

import pytest
import torch

import flashfusemoe.kernels.gathered_gemm as gth

ACTS = ("swiglu", "geglu", "relu2")
# |got - ref| <= atol + rtol * |ref|. fp32: IEEE fp32 dots over <= 64 terms of O(1) values.
# fp16/bf16: fp32 accumulation and one rounding of each stored result (2^-11 / 2^-8 relative;
# the interpreter truncates bf16, so 2^-7), plus the rounding of h that `a` and the GLU backward
# read (one more unit of the same size, propagated through act() with slope <= ~1.1 for
# swiglu/geglu and 2|g| for relu2 on |g| <~ 4: the 4x factor).
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=4 * 2**-11, atol=2e-3),
    torch.bfloat16: dict(rtol=4 * 2**-7, atol=2e-2),
}
D_DIM, F_DIM = 40, 24  # not multiples of the interpreter's 32-wide tiles; D > 32: two K steps


def _act64(g, act):
    if act == "swiglu":
        return g / (1 + torch.exp(-g))
    if act == "geglu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return torch.clamp(g, min=0) ** 2


def _dact64(g, act):
    if act == "swiglu":
        s = 1 / (1 + torch.exp(-g))
        return s + g * s * (1 - s)
    if act == "geglu":
        return 0.5 * (1 + torch.erf(g / math.sqrt(2))) + g * torch.exp(-g * g / 2) / math.sqrt(2 * math.pi)
    return 2 * torch.clamp(g, min=0)


def _layout(N, K, E, routing="random", drop=0.0, tail=0, device="cpu"):
    """A dropless expert-sorted layout built with plain torch: ``(row_to_assign [R], expert_ends [E],
    counts)``, ``R = N*K + tail``. ``drop``: the fraction of rows whose assignment is removed
    (capacity drops, ``-1``) in place; ``tail``: extra ``-1`` rows past ``expert_ends[-1]``."""
    if routing == "one_expert":  # every row in one expert (the kernels allow a token twice there)
        ids = torch.full((N, K), int(torch.randint(0, E, ())))
    else:
        ids = (
            torch.stack([torch.randperm(E)[:K] for _ in range(N)])
            if N
            else torch.zeros(0, K, dtype=torch.long)
        )
        if routing == "skew_empty" and E > 2:  # leave the upper half of the experts empty
            ids = torch.stack([torch.randperm(max(E // 2, K))[:K] for _ in range(N)])
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    r2a = order.to(torch.int32)
    if drop > 0 and r2a.numel():
        r2a = torch.where(torch.rand(r2a.shape) < drop, -1, r2a).to(torch.int32)
    r2a = torch.cat([r2a, torch.full((tail,), -1, dtype=torch.int32)])
    ends = counts.cumsum(0).to(torch.int32)
    return r2a.to(device), ends.to(device), counts.tolist()


def _expert_of_row(counts, R):
    eid = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    return torch.cat([eid, torch.full((R - len(eid),), -1, dtype=torch.long)])


def _gathered64(src, r2a, K):
    """float64 ``src[r2a // K]`` with zero rows for ``-1``."""
    r2a = r2a.cpu().long()
    valid = r2a >= 0
    out = torch.zeros(r2a.numel(), src.shape[1], dtype=torch.float64)
    out[valid] = src.double().cpu()[r2a[valid] // K]
    return out


def _ref_h(x, w_up, r2a, counts, K):
    R = r2a.numel()
    eid = _expert_of_row(counts, R)
    xg = _gathered64(x, r2a, K)
    h = torch.zeros(R, w_up.shape[1], dtype=torch.float64)
    m = eid >= 0
    h[m] = torch.einsum("rd,rnd->rn", xg[m], w_up.double().cpu()[eid[m]])
    return h


def _close(got, ref, dtype, what):
    assert torch.isfinite(got.double()).all(), f"{what}: non-finite values"
    torch.testing.assert_close(got.double().cpu(), ref, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _inputs(N, D, F, E, dtype, device):
    x = torch.randn(N, D, dtype=torch.float64).to(dtype).to(device)
    w_up = (torch.randn(E, 2 * F, D, dtype=torch.float64) * D**-0.5).to(dtype).to(device)
    w_down = (torch.randn(E, D, F, dtype=torch.float64) * F**-0.5).to(dtype).to(device)
    return x, w_up, w_down


def _check_up(x, w_up, r2a, ends, counts, K, act, dtype, save_h=True, save_a=True, **kw):
    a, h = gth.up_proj_glu(x, w_up, r2a, ends, K, act, save_h=save_h, save_a=save_a, **kw)
    F = w_up.shape[1] // 2
    ref_h = _ref_h(x, w_up, r2a, counts, K)
    if save_h:
        assert h.dtype == dtype and h.shape == ref_h.shape
        _close(h, ref_h, dtype, "h")
    else:
        assert h is None
    if not save_a:
        assert a is None
        return a, h
    # `a` is defined on h rounded to the output dtype.
    hr = ref_h.to(dtype).double()
    ref_a = _act64(hr[:, :F], act) * hr[:, F:]
    assert a.dtype == dtype and a.shape == ref_a.shape
    _close(a, ref_a, dtype, "a")
    dead = r2a.cpu() < 0
    assert torch.equal(a.cpu()[dead], torch.zeros_like(a.cpu()[dead])), "rows without an assignment must be 0"
    if save_h:
        assert torch.equal(h.cpu()[dead], torch.zeros_like(h.cpu()[dead]))
    return a, h


def _ref_dgrad(dy, w_down, h, r2a, counts, tw, K, act):
    R = r2a.numel()
    F = w_down.shape[2]
    eid = _expert_of_row(counts, R)
    dyg = _gathered64(dy, r2a, K)
    r2a64 = r2a.cpu().long()
    valid = (r2a64 >= 0) & (eid >= 0)
    da = torch.zeros(R, F, dtype=torch.float64)
    da[valid] = torch.einsum("rd,rdf->rf", dyg[valid], w_down.double().cpu()[eid[valid]])
    w = torch.zeros(R, 1, dtype=torch.float64)
    w[valid, 0] = tw.double().cpu().reshape(-1)[r2a64[valid]]
    h64 = torch.where(valid[:, None], h.double().cpu(), 0.0)
    g, u = h64[:, :F], h64[:, F:]
    act_g = _act64(g, act)
    dh = torch.cat([w * da * u * _dact64(g, act), w * da * act_g], 1)
    return dh, w * act_g * u, (da * act_g * u).sum(1)


def _sorted_dy(dy, r2a, K):
    """``dy`` laid out in expert order ``[R, D]`` for ``sorted_dgrad_glu``; rows without an
    assignment hold random finite values (the kernel must ignore them)."""
    rows = _gathered64(dy, r2a, K)
    dead = r2a.cpu() < 0
    rows[dead] = torch.randn(int(dead.sum()), dy.shape[1], dtype=torch.float64)
    return rows.to(dy.dtype).to(dy.device)


def _check_dgrad(dy, w_down, h, r2a, ends, counts, tw, K, act, dtype, layout="gathered", **kw):
    if layout == "sorted":
        dh, aw, gw = gth.sorted_dgrad_glu(_sorted_dy(dy, r2a, K), w_down, h, r2a, ends, tw, K, act, **kw)
    else:
        dh, aw, gw = gth.gathered_dgrad_glu(dy, w_down, h, r2a, ends, tw, K, act, **kw)
    ref_dh, ref_aw, ref_gw = _ref_dgrad(dy, w_down, h, r2a, counts, tw, K, act)
    assert dh.dtype == dtype and aw.dtype == dtype and gw.dtype == tw.dtype
    _close(dh, ref_dh, dtype, "dh")
    _close(aw, ref_aw, dtype, "a_weighted")
    # grad_w_row is fp32 (never rounded to the input dtype): only the fp32 accumulation error.
    torch.testing.assert_close(gw.double().cpu(), ref_gw, rtol=1e-5, atol=1e-5 * (1 + F_DIM))
    dead = r2a.cpu() < 0
    for t in (dh, aw, gw):
        assert torch.equal(t.cpu()[dead], torch.zeros_like(t.cpu()[dead]))
    return dh, aw, gw


def _ref_wgrad(a_rows, b_rows, counts):
    E = len(counts)
    eid = _expert_of_row(counts, a_rows.shape[0])
    m = eid >= 0
    onehot = torch.nn.functional.one_hot(eid[m], E).double()
    return torch.einsum("re,rm,rn->emn", onehot, a_rows[m], b_rows[m])


def _check_wgrad(a, b, r2a, ends, counts, K, gather, dtype, **kw):
    out = gth.gathered_weight_grad(a, b, r2a, ends, K, gather, **kw)
    if gather == "a":
        a_rows, b_rows = _gathered64(a, r2a, K), b.double().cpu()
    else:
        a_rows, b_rows = a.double().cpu(), _gathered64(b, r2a, K)
    ref = _ref_wgrad(a_rows, b_rows, counts)
    assert out.dtype == dtype and out.shape == ref.shape
    _close(out, ref, dtype, f"weight grad (gather={gather})")
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(out[e].cpu(), torch.zeros_like(out[e].cpu())), (
                f"expert {e} is empty: exact zeros"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Forward: up-projection + GLU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_up_proj_glu_activations(act, dtype, device):
    N, K, E = 23, 3, 5
    x, w_up, _ = _inputs(N, D_DIM, F_DIM, E, dtype, device)
    r2a, ends, counts = _layout(N, K, E, device=device)
    _check_up(x, w_up, r2a, ends, counts, K, act, dtype)


@pytest.mark.parametrize("routing", ["one_expert", "skew_empty"])
@pytest.mark.parametrize("K", [1, 8])
def test_up_proj_glu_routing(routing, K, device):
    N, E = 13, 9
    x, w_up, _ = _inputs(N, D_DIM, F_DIM, E, torch.float32, device)
    r2a, ends, counts = _layout(N, K, E, routing=routing, device=device)
    assert 0 in counts
    _check_up(x, w_up, r2a, ends, counts, K, "swiglu", torch.float32)


def test_up_proj_glu_drops_tail_and_many_experts(device):
    """Capacity-dropped rows, a tail past expert_ends[-1] and E = 256 (most experts empty)."""
    N, K, E = 11, 4, 256
    x, w_up, _ = _inputs(N, D_DIM, F_DIM, E, torch.float16, device)
    r2a, ends, counts = _layout(N, K, E, drop=0.3, tail=37, device=device)
    # Garbage in the outputs before the call: every row must be written.
    a_out = torch.full((r2a.numel(), F_DIM), float("nan"), dtype=torch.float16, device=device)
    h_out = torch.full((r2a.numel(), 2 * F_DIM), float("nan"), dtype=torch.float16, device=device)
    a, h = _check_up(x, w_up, r2a, ends, counts, K, "geglu", torch.float16, a_out=a_out, h_out=h_out)
    assert a is a_out and h is h_out


def test_up_proj_glu_no_h_and_pointer_weights(device):
    """save_h=False / save_a=False skip an output; the pointer path of the weights (tma off)
    gives the same results."""
    N, K, E = 17, 2, 4
    x, w_up, _ = _inputs(N, D_DIM, F_DIM, E, torch.float16, device)
    r2a, ends, counts = _layout(N, K, E, device=device)
    assert gth._tma_ok(w_up), "the default path should use the TMA descriptor here"
    a, _ = _check_up(x, w_up, r2a, ends, counts, K, "relu2", torch.float16, save_h=False)
    a2, h2 = _check_up(x, w_up, r2a, ends, counts, K, "relu2", torch.float16, config={"tma": False})
    assert torch.equal(a, a2)
    h_out = torch.full_like(h2, float("nan"))
    _, h3 = _check_up(x, w_up, r2a, ends, counts, K, "relu2", torch.float16, save_a=False, h_out=h_out)
    assert h3 is h_out and torch.equal(h3, h2)
    with pytest.raises(ValueError, match="nothing to compute"):
        gth.up_proj_glu(x, w_up, r2a, ends, K, "relu2", save_a=False, save_h=False)


def test_up_proj_glu_tile_config_sweep(device):
    """Other tile shapes (BLOCK_M 16, BLOCK_N 16 over F = 24: a partial N-tile) agree."""
    N, K, E = 19, 2, 3
    x, w_up, _ = _inputs(N, D_DIM, F_DIM, E, torch.float32, device)
    r2a, ends, counts = _layout(N, K, E, device=device)
    _check_up(
        x,
        w_up,
        r2a,
        ends,
        counts,
        K,
        "swiglu",
        torch.float32,
        config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    )


def test_up_proj_glu_bad_inputs(device):
    x, w_up, _ = _inputs(4, D_DIM, F_DIM, 2, torch.float32, device)
    r2a, ends, _ = _layout(4, 2, 2, device=device)
    with pytest.raises(ValueError, match="activation"):
        gth.up_proj_glu(x, w_up, r2a, ends, 2, "gelu")
    with pytest.raises(ValueError, match="w_up"):
        gth.up_proj_glu(x, w_up[:, :, :-1], r2a, ends, 2, "swiglu")
    with pytest.raises(TypeError, match="row_to_assign"):
        gth.up_proj_glu(x, w_up, r2a.long(), ends, 2, "swiglu")
    with pytest.raises(ValueError, match="top_k"):
        gth.up_proj_glu(x, w_up, r2a, ends, 0, "swiglu")
    with pytest.raises(ValueError, match="a_out"):
        gth.up_proj_glu(x, w_up, r2a, ends, 2, "swiglu", a_out=torch.empty(3, F_DIM, device=device))
    with pytest.raises(ValueError, match="save_h"):
        gth.up_proj_glu(
            x, w_up, r2a, ends, 2, "swiglu", save_h=False, h_out=torch.empty(8, 2 * F_DIM, device=device)
        )


# ---------------------------------------------------------------------------------------------
# Backward: down-projection input gradient + GLU backward
# ---------------------------------------------------------------------------------------------


def _h_like_forward(N, K, E, dtype, device, **layout_kw):
    x, w_up, w_down = _inputs(N, D_DIM, F_DIM, E, dtype, device)
    r2a, ends, counts = _layout(N, K, E, device=device, **layout_kw)
    h = torch.randn(r2a.numel(), 2 * F_DIM, dtype=torch.float64).to(dtype).to(device)
    h[r2a < 0] = float("nan")  # rows without an assignment may hold garbage
    dy = torch.randn(N, D_DIM, dtype=torch.float64).to(dtype).to(device)
    tw = torch.rand(N, K, dtype=torch.float32).to(device)
    return dy, w_down, h, r2a, ends, counts, tw


LAYOUTS = ("gathered", "sorted")  # gathered_dgrad_glu (dy by token) / sorted_dgrad_glu (dy laid out)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dgrad_glu_activations(act, dtype, layout, device):
    N, K = 21, 3
    dy, w_down, h, r2a, ends, counts, tw = _h_like_forward(N, K, 5, dtype, device, drop=0.2)
    _check_dgrad(dy, w_down, h, r2a, ends, counts, tw, K, act, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("routing", ["one_expert", "skew_empty"])
@pytest.mark.parametrize("K", [1, 8])
def test_dgrad_glu_routing(routing, K, layout, device):
    N = 13
    dy, w_down, h, r2a, ends, counts, tw = _h_like_forward(N, K, 9, torch.float32, device, routing=routing)
    _check_dgrad(dy, w_down, h, r2a, ends, counts, tw, K, "geglu", torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dgrad_glu_tail_outputs_and_partial_sums(layout, device):
    """E = 256 with a tail; caller buffers full of NaN; BLOCK_N 16 over F = 24 makes two
    partial sums of grad_w_row per row; tma off (pointer loads) agrees with tma on at that BLOCK_N."""
    N, K = 9, 5
    dy, w_down, h, r2a, ends, counts, tw = _h_like_forward(
        N, K, 256, torch.float16, device, drop=0.3, tail=21
    )
    R = r2a.numel()
    outs = dict(
        dh_out=torch.full((R, 2 * F_DIM), float("nan"), dtype=torch.float16, device=device),
        a_weighted_out=torch.full((R, F_DIM), float("nan"), dtype=torch.float16, device=device),
        grad_w_row_out=torch.full((R,), float("nan"), device=device),
    )
    torch.manual_seed(1)
    res = _check_dgrad(dy, w_down, h, r2a, ends, counts, tw, K, "swiglu", torch.float16, layout,
                       config=dict(BLOCK_N=16), **outs)
    assert all(r is o for r, o in zip(res, outs.values(), strict=True))
    torch.manual_seed(1)
    res2 = _check_dgrad(
        dy, w_down, h, r2a, ends, counts, tw, K, "swiglu", torch.float16, layout,
        config=dict(BLOCK_N=16, tma=False),
    )
    assert torch.equal(res[0], res2[0]) and torch.equal(res[1], res2[1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dgrad_glu_bad_inputs(layout, device):
    """Each bad argument raises naming it; nothing is computed on a mis-shaped input."""
    N, K = 6, 2
    dy, w_down, h, r2a, ends, _, tw = _h_like_forward(N, K, 4, torch.float32, device)
    R = r2a.numel()
    if layout == "sorted":
        fn, src = gth.sorted_dgrad_glu, torch.zeros(R, D_DIM, device=device)
    else:
        fn, src = gth.gathered_dgrad_glu, dy
    with pytest.raises(ValueError, match="activation"):
        fn(src, w_down, h, r2a, ends, tw, K, "tanh")
    with pytest.raises(ValueError, match=r"h must be \[R, 2F\]"):
        fn(src, w_down, h[:, :-1], r2a, ends, tw, K, "swiglu")
    with pytest.raises(ValueError, match="topk_weights"):
        fn(src, w_down, h, r2a, ends, tw[:, :1], K, "swiglu")
    with pytest.raises(TypeError, match="w_down"):
        fn(src, w_down.double(), h, r2a, ends, tw, K, "swiglu")
    with pytest.raises(ValueError, match="w_down"):
        fn(src, w_down[:, :-1], h, r2a, ends, tw, K, "swiglu")
    with pytest.raises(ValueError, match="dh_out"):
        fn(src, w_down, h, r2a, ends, tw, K, "swiglu", dh_out=torch.empty(R, F_DIM, device=device))
    if layout == "sorted":
        with pytest.raises(ValueError, match=f"R = {R} rows"):
            fn(src[:-1], w_down, h, r2a, ends, tw, K, "swiglu")


@pytest.mark.parametrize("split, n_acc", [(1, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_dgrad_glu_epilogue_chunks(split, n_acc, device):
    """The epilogue on 1, 2 or 4 column chunks of each of 1 or 2 accumulators gives the dh and
    a_weighted of one unsplit accumulator of the same width bit for bit (elementwise math);
    grad_w_row only reorders an fp32 sum. (F = 24 with 2 x 16-wide accumulators: the second one
    partly past F.) The same width, because the interpreter's dot may round an element
    differently for another BLOCK_N."""
    N, K = 14, 4
    dy, w_down, h, r2a, ends, counts, tw = _h_like_forward(N, K, 7, torch.float16, device, drop=0.2, tail=3)
    block_n = 16 if n_acc == 2 else 32
    ref = _check_dgrad(dy, w_down, h, r2a, ends, counts, tw, K, "geglu", torch.float16,
                       config={"EPI_SPLIT": 1, "N_ACC": 1, "BLOCK_N": block_n})
    got = _check_dgrad(
        dy,
        w_down,
        h,
        r2a,
        ends,
        counts,
        tw,
        K,
        "geglu",
        torch.float16,
        config={"EPI_SPLIT": split, "N_ACC": n_acc, "BLOCK_N": block_n},
    )
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    torch.testing.assert_close(ref[2], got[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gathered_mm(dtype, device):
    """The plain gathered GEMM (no epilogue): drops, a tail, E = 256, NaN-filled out buffer."""
    N, K, E = 12, 6, 256
    dy, _, w_down = _inputs(N, D_DIM, F_DIM, E, dtype, device)
    r2a, ends, counts = _layout(N, K, E, drop=0.25, tail=9, device=device)
    R = r2a.numel()
    out = torch.full((R, F_DIM), float("nan"), dtype=dtype, device=device)
    got = gth.gathered_mm(dy, w_down, r2a, ends, K, out=out)
    assert got is out
    eid = _expert_of_row(counts, R)
    valid = (r2a.cpu() >= 0) & (eid >= 0)
    ref = torch.zeros(R, F_DIM, dtype=torch.float64)
    ref[valid] = torch.einsum("rd,rdf->rf", _gathered64(dy, r2a, K)[valid], w_down.double().cpu()[eid[valid]])
    _close(got, ref, dtype, "gathered_mm")
    dead = r2a.cpu() < 0
    assert torch.equal(got.cpu()[dead], torch.zeros_like(got.cpu()[dead]))
    assert torch.equal(gth.gathered_mm(dy, w_down, r2a, ends, K, config={"tma": False}), got)
    with pytest.raises(ValueError, match="unknown keys"):
        gth.gathered_mm(dy, w_down, r2a, ends, K, config={"EPI_SPLIT": 2})


def test_dgrad_glu_matches_glu_backward(device):
    """Same semantics as activation.glu_backward fed with the unfused da (fp64 torch path)."""
    from flashfusemoe.kernels import activation

    N, K = 15, 2
    dy, w_down, h, r2a, ends, counts, tw = _h_like_forward(N, K, 4, torch.float32, device, drop=0.25)
    dh, aw, gw = gth.gathered_dgrad_glu(dy, w_down, h, r2a, ends, tw, K, "relu2")
    h64 = torch.where((r2a < 0)[:, None], 0.0, h.double())
    eid = _expert_of_row(counts, r2a.numel())
    da = torch.zeros(r2a.numel(), F_DIM, dtype=torch.float64)
    m = eid >= 0
    da[m] = torch.einsum("rd,rdf->rf", _gathered64(dy, r2a, K)[m], w_down.double().cpu()[eid[m]])
    ref = activation.glu_backward(h64.to(device), da.to(device), "relu2", r2a, tw.double())
    for got, want in zip((dh, aw, gw), ref, strict=True):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Weight gradients with a gathered operand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gather", ["a", "b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_weight_grad(gather, dtype, device):
    N, K, E = 25, 3, 6
    r2a, ends, counts = _layout(N, K, E, routing="skew_empty", drop=0.2, tail=5, device=device)
    R = r2a.numel()
    tok = torch.randn(N, D_DIM, dtype=torch.float64).to(dtype).to(device)
    rows = torch.randn(R, F_DIM, dtype=torch.float64).to(dtype).to(device)
    rows[ends[-1].item() :] = float("nan")  # never read
    a, b = (tok, rows) if gather == "a" else (rows, tok)
    _check_wgrad(a, b, r2a, ends, counts, K, gather, dtype)


@pytest.mark.parametrize("gather", ["a", "b"])
@pytest.mark.parametrize("K", [1, 8])
def test_weight_grad_routing_and_out(gather, K, device):
    """One expert holding every row (> 2 chunks of 32 rows: full TMA chunks + a partial one),
    E = 256 with the rest empty, written into a NaN-filled caller buffer. Widths 24 and 20 (masked,
    one 32-wide interpreter tile each) keep it to one program per expert."""
    N, E = 11, 256
    r2a, ends, counts = _layout(N, K, E, routing="one_expert", device=device)
    R = r2a.numel()
    tok = torch.randn(N, 24, dtype=torch.float64).to(torch.float16).to(device)
    rows = torch.randn(R, 20, dtype=torch.float64).to(torch.float16).to(device)
    a, b = (tok, rows) if gather == "a" else (rows, tok)
    out = torch.full((E, a.shape[1], b.shape[1]), float("nan"), dtype=torch.float16, device=device)
    got = _check_wgrad(a, b, r2a, ends, counts, K, gather, torch.float16, out=out)
    assert got is out
    got2 = _check_wgrad(a, b, r2a, ends, counts, K, gather, torch.float16, config={"tma": False})
    assert torch.equal(got, got2)


@pytest.mark.parametrize("idx64", [False, True])
def test_weight_grad_even_tiles(idx64, device):
    """M and N multiples of the tile (no column masks in the TMA loop), 32- and 64-bit token
    offsets; more than one full 32-row chunk per expert."""
    N, K, E = 40, 4, 3
    r2a, ends, counts = _layout(N, K, E, drop=0.1, device=device)
    tok = torch.randn(N, 64, dtype=torch.float64).to(torch.float16).to(device)
    rows = torch.randn(r2a.numel(), 32, dtype=torch.float64).to(torch.float16).to(device)
    for gather, (a, b) in (("a", (tok, rows)), ("b", (rows, tok))):
        _check_wgrad(a, b, r2a, ends, counts, K, gather, torch.float16, config={"IDX64": idx64})


def test_even_k(device):
    """D a multiple of BLOCK_K (no K masks) in the up-projection and the GLU backward."""
    N, K, E, D = 15, 3, 4, 64
    x, w_up, w_down = _inputs(N, D, F_DIM, E, torch.float16, device)
    r2a, ends, counts = _layout(N, K, E, drop=0.2, device=device)
    _, h = _check_up(x, w_up, r2a, ends, counts, K, "swiglu", torch.float16)
    tw = torch.rand(N, K, device=device)
    _check_dgrad(x, w_down, h, r2a, ends, counts, tw, K, "swiglu", torch.float16)


def test_weight_grad_no_rows(device):
    r2a = torch.empty(0, dtype=torch.int32, device=device)
    ends = torch.zeros(3, dtype=torch.int32, device=device)
    out = gth.gathered_weight_grad(
        torch.randn(0, 8, device=device), torch.randn(0, 5, device=device), r2a, ends, 2, "a"
    )
    assert out.shape == (3, 8, 5) and torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# fp64 (torch fallback) and the whole expert MLP against an autograd reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_expert_mlp_forward_backward_fp64(act, device):
    """The kernels chained as the MoE layer will chain them reproduce autograd on a float64
    per-assignment loop (fp64 takes the fallback; fp32 the kernels)."""
    N, K, E = 10, 3, 4
    for dtype in (torch.float64, torch.float32):
        x, w_up, w_down = _inputs(N, D_DIM, F_DIM, E, dtype, device)
        r2a, ends, counts = _layout(N, K, E, drop=0.2, device=device)
        tw = torch.rand(N, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
        dy = torch.randn(N, D_DIM, dtype=torch.float64).to(dtype).to(device)
        # reference: y[n] = sum over kept assignments of w * down(act(up(x[n]))), autograd in fp64
        leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, w_up, w_down)]
        xl, wul, wdl = leaves
        eid = _expert_of_row(counts, r2a.numel())
        y = torch.zeros(N, D_DIM, dtype=torch.float64)
        for r, asg in enumerate(r2a.tolist()):
            if asg < 0:
                continue
            n = asg // K
            hh = wul[eid[r]] @ xl[n]
            aa = _act64(hh[:F_DIM], act) * hh[F_DIM:]
            y = y.index_add(
                0, torch.tensor([n]), (tw.double().cpu().reshape(-1)[asg] * (wdl[eid[r]] @ aa))[None]
            )
        gx, gwu, gwd = torch.autograd.grad(y, leaves, dy.double().cpu())

        _, h = gth.up_proj_glu(x, w_up, r2a, ends, K, act)
        dh, aw, _ = gth.gathered_dgrad_glu(dy, w_down, h, r2a, ends, tw, K, act)
        grad_w_down = gth.gathered_weight_grad(dy, aw, r2a, ends, K, "a")
        grad_w_up = gth.gathered_weight_grad(dh, x, r2a, ends, K, "b")
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad_w_down.double().cpu(), gwd, **tol)
        torch.testing.assert_close(grad_w_up.double().cpu(), gwu, **tol)
        # grad_x = combine of dh @ w_up[e] (the grouped GEMM that stays): check through the reference
        dxr = torch.zeros(N, D_DIM, dtype=torch.float64)
        for r, asg in enumerate(r2a.tolist()):
            if asg >= 0:
                dxr[asg // K] += dh.double().cpu()[r] @ w_up.double().cpu()[eid[r]]
        torch.testing.assert_close(dxr, gx, **tol)


# ---------------------------------------------------------------------------------------------
# GPU (bf16, determinism)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_gpu_bf16(act):
    N, K, E, D, F = 300, 4, 16, 256, 192
    x, w_up, w_down = _inputs(N, D, F, E, torch.bfloat16, "cuda")
    r2a, ends, counts = _layout(N, K, E, drop=0.1, tail=40, device="cuda")
    tw = torch.rand(N, K, device="cuda")
    dy = torch.randn(N, D, device="cuda").bfloat16()
    a, h = gth.up_proj_glu(x, w_up, r2a, ends, K, act)
    ref_h = _ref_h(x, w_up, r2a, counts, K)
    tol = dict(rtol=2**-7, atol=3e-2)
    torch.testing.assert_close(h.double().cpu(), ref_h, **tol)
    hr = ref_h.to(torch.bfloat16).double()
    torch.testing.assert_close(a.double().cpu(), _act64(hr[:, :F], act) * hr[:, F:], rtol=2**-6, atol=3e-2)
    rdh, raw, rgw = _ref_dgrad(dy, w_down, h, r2a, counts, tw, K, act)
    dy_sorted = _sorted_dy(dy, r2a, K)
    for dgrad in (gth.gathered_dgrad_glu(dy, w_down, h, r2a, ends, tw, K, act),
                  gth.sorted_dgrad_glu(dy_sorted, w_down, h, r2a, ends, tw, K, act)):
        dh, aw, gw = dgrad
        torch.testing.assert_close(dh.double().cpu(), rdh, rtol=2**-6, atol=3e-2)
        torch.testing.assert_close(aw.double().cpu(), raw, rtol=2**-6, atol=3e-2)
        torch.testing.assert_close(gw.double().cpu(), rgw, rtol=1e-4, atol=1e-3)
    dh, aw, gw = gth.gathered_dgrad_glu(dy, w_down, h, r2a, ends, tw, K, act)
    for gather, (ga, gb) in (("a", (dy, aw)), ("b", (dh, x))):
        out = gth.gathered_weight_grad(ga, gb, r2a, ends, K, gather)
        rows_a = _gathered64(ga, r2a, K) if gather == "a" else ga.double().cpu()
        rows_b = gb.double().cpu() if gather == "a" else _gathered64(gb, r2a, K)
        ref = _ref_wgrad(rows_a, rows_b, counts)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=2**-6, atol=0.05 * ref.abs().max().item())


@pytest.mark.gpu
def test_gpu_deterministic():
    N, K, E, D, F = 2048, 8, 64, 512, 256
    x, w_up, w_down = _inputs(N, D, F, E, torch.bfloat16, "cuda")
    r2a, ends, _ = _layout(N, K, E, device="cuda")
    tw = torch.rand(N, K, device="cuda")
    dy = torch.randn(N, D, device="cuda").bfloat16()

    dy_sorted = _sorted_dy(dy, r2a, K)

    def run():
        a, h = gth.up_proj_glu(x, w_up, r2a, ends, K, "swiglu")
        dh, aw, gw = gth.gathered_dgrad_glu(dy, w_down, h, r2a, ends, tw, K, "swiglu")
        return (
            a,
            h,
            dh,
            aw,
            gw,
            *gth.sorted_dgrad_glu(dy_sorted, w_down, h, r2a, ends, tw, K, "swiglu"),
            gth.gathered_weight_grad(dy, aw, r2a, ends, K, "a"),
            gth.gathered_weight_grad(dh, x, r2a, ends, K, "b"),
        )

    first, second = run(), run()
    for u, v in zip(first, second, strict=True):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------
# sm_90 compile of every kernel variant
# ---------------------------------------------------------------------------------------------


def _aot_kernel_specs(dtype: torch.dtype) -> list[tuple]:
    """The kernel variants the wrappers launch for ``dtype`` on a GPU, with the module's fixed
    configurations (``gth._config``, each F-dependent choice): TMA and pointer weights (16-bit),
    every activation, each output combination."""
    from aot_specs import TRITON_DTYPES, launch_options

    t = TRITON_DTYPES[dtype]
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "EPI_SPLIT", "N_ACC")
    specs = []
    # Pointer weights in bf16 and fp32; TMA weights in both 16-bit types.
    tma_options = {torch.bfloat16: (False, True), torch.float16: (True,)}.get(dtype, (False,))
    for use_tma in tma_options:
        up_cfgs = {tuple(gth._config("up", dtype, f, interpret=False).items()) for f in (256, 2048)}
        for n_cfg, cfg in enumerate(sorted(up_cfgs)):
            cfg = dict(cfg)
            desc = f"tensordesc<{t}[{cfg['BLOCK_N']}, {cfg['BLOCK_K']}]>" if use_tma else f"*{t}"
            for act in ACTS if n_cfg == 0 else ("swiglu",):
                for save_h, save_a in (
                    ((False, True), (True, False), (True, True))
                    if act == "swiglu" and n_cfg == 0
                    else ((True, True),)
                ):
                    sig = {
                        "x_ptr": f"*{t}",
                        "w_ptr": f"*{t}",
                        "w_desc": desc,
                        "r2a_ptr": "*i32",
                        "ends_ptr": "*i32",
                        "h_ptr": f"*{t}",
                        "a_ptr": f"*{t}",
                    }
                    sig.update(
                        {
                            k: "i32"
                            for k in ("R", "D", "F", "E", "stride_x", "stride_we", "stride_wn", "TOP_K")
                        }
                    )
                    consts = {"ACT": ACTS.index(act), "SAVE_H": save_h, "SAVE_A": save_a, "USE_TMA": use_tma}
                    consts["EVEN_K"] = use_tma  # D % BLOCK_K == 0 is the common case; both compiled
                    consts.update({k: cfg[k] for k in blocks if k in cfg}, BLOCK_E=128)
                    sig.update({k: "constexpr" for k in consts})
                    specs.append((gth._up_glu_kernel, sig, consts, launch_options(cfg)))
        for kind, acts in (("dgrad", ACTS), ("mm", (None,))):
            cfg = gth._config(kind, dtype, 256, interpret=False)
            desc = f"tensordesc<{t}[{cfg['BLOCK_K']}, {cfg['BLOCK_N']}]>" if use_tma else f"*{t}"
            for act in acts:
                sig = {
                    "dy_ptr": f"*{t}",
                    "dy_desc": f"*{t}",
                    "w_ptr": f"*{t}",
                    "w_desc": desc,
                    "h_ptr": f"*{t}",
                    "r2a_ptr": "*i32",
                    "ends_ptr": "*i32",
                    "tw_ptr": "*fp32" if act else f"*{t}",
                    "dh_ptr": f"*{t}",
                    "aw_ptr": f"*{t}",
                    "gw_ptr": "*fp32" if act else f"*{t}",
                }
                names = ("R", "D", "F", "E", "stride_dy", "stride_we", "stride_wd", "stride_h", "TOP_K")
                sig.update({k: "i32" for k in names})
                consts = {"ACT": ACTS.index(act) if act else 0, "GLU": act is not None, "USE_TMA": use_tma}
                consts.update(EVEN_K=use_tma, DY_SORTED=False, DY_TMA=False)
                consts.update({k: cfg[k] for k in blocks if k in cfg}, BLOCK_E=128)
                consts.setdefault("EPI_SPLIT", 1)
                sig.update({k: "constexpr" for k in consts})
                specs.append((gth._dgrad_glu_kernel, sig, consts, launch_options(cfg)))
                if act == "swiglu":  # sorted_dgrad_glu (dy in expert order, TMA rows where allowed): the
                    # prologue differs, the epilogue is the one compiled above for every activation
                    sorted_sig = dict(sig, dy_desc=f"tensordesc<{t}[{cfg['BLOCK_M']}, {cfg['BLOCK_K']}]>"
                                      if use_tma else f"*{t}")
                    sorted_consts = dict(consts, DY_SORTED=True, DY_TMA=use_tma)
                    sorted_cfg = gth._config("dgrad_sorted", dtype, 256, interpret=False)
                    specs.append(
                        (gth._dgrad_glu_kernel, sorted_sig, sorted_consts, launch_options(sorted_cfg)))
                if act == "swiglu":  # the other chunkings and accumulator counts
                    for n_acc, split in ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2)):
                        if (n_acc, split) != (cfg["N_ACC"], cfg.get("EPI_SPLIT", 1)):
                            specs.append(
                                (gth._dgrad_glu_kernel, sig, dict(consts, N_ACC=n_acc, EPI_SPLIT=split),
                                 launch_options(cfg))
                            )
        for gather_a, idx64 in ((True, False), (False, False), (True, True), (False, True)):
            cfg = gth._config("wgrad_a" if gather_a else "wgrad_b", dtype, interpret=False)
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            if idx64 and not use_tma:
                continue  # the flags shape the TMA loop only
            a_desc = b_desc = f"*{t}"
            if use_tma and gather_a:
                b_desc = f"tensordesc<{t}[{bk}, {bn}]>"
            elif use_tma:
                a_desc = f"tensordesc<{t}[{bk}, {bm}]>"
            # a float32 gradient (of float32 master weights) from 16-bit operands too
            for out_t in dict.fromkeys((t, "fp32")):
                sig = {
                    "a_ptr": f"*{t}",
                    "b_ptr": f"*{t}",
                    "a_desc": a_desc,
                    "b_desc": b_desc,
                    "r2a_ptr": "*i32",
                    "ends_ptr": "*i32",
                    "out_ptr": f"*{out_t}",
                }
                sig.update({k: "i32" for k in ("M", "N", "stride_a", "stride_b", "TOP_K")})
                consts = {"GATHER_A": gather_a, "SORTED_TMA": use_tma, "IDX64": idx64, "EVEN_MN": not idx64}
                consts.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                sig.update({k: "constexpr" for k in consts})
                specs.append((gth._gathered_wgrad_kernel, sig, consts, launch_options(cfg)))
    return specs


def aot_specs() -> list:
    """``(kernel, signature, constexprs, options)`` of every gathered-GEMM kernel variant, for
    tests/kernels/aot_compile.py (this module has no ``AOT_SPECS`` of its own)."""
    return [
        spec for dtype in (torch.bfloat16, torch.float16, torch.float32) for spec in _aot_kernel_specs(dtype)
    ]


def test_aot_specs_cover_every_kernel():
    """tests/kernels/test_aot.py compiles ``aot_specs()`` for sm_90 (through aot_compile.py, which
    reads this module's specs since gathered_gemm has no AOT_SPECS); every kernel of the module
    is in it, with each constexpr variant the wrappers can launch. Compile only these with
    ``python tests/kernels/aot_compile.py gathered_gemm`` (without TRITON_INTERPRET)."""
    from flashfusemoe.kernels.launch import FastLaunch

    kernels = {v for v in vars(gth).values() if isinstance(v, FastLaunch)}
    specs = [spec[:3] for spec in aot_specs()]  # (kernel, signature, constexprs)
    assert {k for k, _, _ in specs} == kernels
    up = {(c["ACT"], c["SAVE_H"], c["SAVE_A"], c["USE_TMA"]) for k, _, c in specs if k is gth._up_glu_kernel}
    assert {(h, a) for _, h, a, _ in up} == {(True, True), (True, False), (False, True)}
    assert {act for act, *_ in up} == set(range(len(ACTS)))
    dgrad = {(c["ACT"], c["GLU"]) for k, _, c in specs if k is gth._dgrad_glu_kernel}
    assert dgrad == {(a, True) for a in range(len(ACTS))} | {(0, False)}
    dy_modes = {(c["DY_SORTED"], c["DY_TMA"]) for k, _, c in specs if k is gth._dgrad_glu_kernel}
    assert dy_modes == {(False, False), (True, False), (True, True)}
    chunks = {(c["N_ACC"], c["EPI_SPLIT"]) for k, _, c in specs if k is gth._dgrad_glu_kernel and c["GLU"]}
    assert {(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)} <= chunks
    wgrad = {(c["GATHER_A"], c["SORTED_TMA"], s["out_ptr"] == "*fp32") for k, s, c in specs
             if k is gth._gathered_wgrad_kernel}
    assert wgrad == {(g, t, f) for g in (True, False) for t in (True, False) for f in (True, False)}
    for kernel, sig, consts in specs:
        params = kernel.fn.arg_names
        assert set(sig) == set(params), (kernel.fn.__name__, set(sig) ^ set(params))
        assert all(sig[p] == "constexpr" for p in consts)


def test_layout_without_gather_feeds_the_kernels(device):
    """The wiring's layout-only call: ``permute.layout_and_gather`` on a zero-width view of x
    (and ``capacity_drop`` on the zero-width x_sorted) gives the same maps as with x, and those
    maps drive ``up_proj_glu`` to the unfused result."""
    from flashfusemoe.kernels import permute, routing

    N, D, E, K = 37, D_DIM, 6, 2
    x, w_up, _ = _inputs(N, D, F_DIM, E, torch.float32, device)
    router = torch.randn(E, D, device=device)
    _, ids, tw, block_counts, block_n = routing.route_forward(
        x, router, None, K, "softmax", True, None, None, 1.0, with_block_counts=True
    )
    full = permute.layout_and_gather(x, ids, E, block_counts, block_n)
    bare = permute.layout_and_gather(x[:, :0], ids, E, block_counts, block_n)
    assert bare[0].shape == (N * K, 0)
    for u, v in zip(full[1:], bare[1:], strict=True):
        assert torch.equal(u, v)
    cap = 5
    permute.capacity_drop(full[0], tw, *full[1:4], cap)
    permute.capacity_drop(bare[0], tw, *bare[1:4], cap)
    for u, v in zip(full[1:], bare[1:], strict=True):
        assert torch.equal(u, v)
    _, a2r, r2a, ends, _, _ = bare
    assert (r2a < 0).any(), "the capacity should have dropped rows"
    a, h = gth.up_proj_glu(x, w_up, r2a, ends, K, "swiglu")
    ref_h = torch.zeros_like(h)
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    eid = _expert_of_row(counts, r2a.numel())
    for r in range(r2a.numel()):
        if r2a[r] >= 0:
            ref_h[r] = full[0][r] @ w_up[eid[r]].T
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
