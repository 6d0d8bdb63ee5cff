"""Router kernels against a float64 reference written per token in plain Python.

Every test runs twice: through the Triton kernel (the interpreter on CPU) and through the
torch fallback (``use_triton`` patched to False).
"""

import pytest
import torch

from flashfusemoe.kernels import routing

# fp32 routing math: logits are sums of D <= 72 products of O(1) values (error ~ D * 6e-8 * |x||w|),
# softmax / sigmoid / normalisation add a few ulps: 2e-5 leaves a margin of ~10x.
TOL_FP32 = 2e-5
# fp64 routing math: same reasoning with eps = 1.1e-16.
TOL_FP64 = 1e-12
# bf16/fp16 inputs: the reference sees the same quantised values, and bf16 x bf16 products are
# exact in fp32, so only fp32 accumulation differs. GPU tensor cores may accumulate with a few
# bits less than fp32 (Hopper wgmma), hence a tolerance 5x above the fp32 one.
TOL_HALF = 1e-4
# Two selection scores closer than this (but not equal) in the fp64 reference may be ordered
# differently by fp32 routing math: such rows are "near ties" and may pick other experts.
NEAR_TIE = 1e-5


def _tol(dtype):
    return {torch.float64: TOL_FP64, torch.float32: TOL_FP32}.get(dtype, TOL_HALF)


@pytest.fixture(params=["triton", "torch"])
def impl(request, monkeypatch):
    """Which implementation the wrappers dispatch to; the torch fallback records its calls."""
    calls = []
    if request.param == "torch":

        def no_triton(t):
            calls.append(t.shape)
            return False

        monkeypatch.setattr(routing, "use_triton", no_triton)
    yield request.param
    if request.param == "torch":
        assert calls, "the torch fallback was not used"


def ref_scores(logits, score_func):
    return torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, dim=-1)


def ref_select_row(sel, top_k, n_group, topk_group):
    """Selected experts of one token (list of floats) and whether it has a near tie."""
    E = len(sel)
    allowed = list(range(E))
    near = [sel]
    if n_group is not None:
        G = E // n_group
        gscore = [sum(sorted(sel[g * G : (g + 1) * G], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        allowed = [e for e in range(E) if e // G in kept]
        near.append(gscore)
    ids = sorted(allowed, key=lambda e: (-sel[e], e))[:top_k]
    ambiguous = any(0 < abs(a - b) < NEAR_TIE for vals in near for a in vals for b in vals)
    return ids, ambiguous


def reference(x, w, bias, top_k, score_func, norm, n_group, topk_group, scale):
    """float64 logits, ids, near-tie flags per token, and the weights function of ids."""
    logits = x.double() @ w.double().T
    scores = ref_scores(logits, score_func)
    sel = scores if bias is None else scores + bias.double()
    rows = [ref_select_row(s, top_k, n_group, topk_group) for s in sel.tolist()]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long).view(len(rows), top_k)
    ambiguous = torch.tensor([r[1] for r in rows], dtype=torch.bool)

    def weights(chosen):
        r = scores.gather(1, chosen.long())
        if norm:
            r = r / r.sum(-1, keepdim=True)
        return r * scale

    return logits, ids, ambiguous, weights


def check_route(x, w, bias, top_k, score_func, norm, n_group, topk_group, scale, strict_ties=False):
    N, E = x.shape[0], w.shape[0]
    logits, ids, wts = routing.route_forward(x, w, bias, top_k, score_func, norm, n_group, topk_group, scale)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert logits.shape == (N, E) and logits.dtype == cdt
    assert ids.shape == (N, top_k) and ids.dtype == torch.int32
    assert wts.shape == (N, top_k) and wts.dtype == cdt

    ref_logits, ref_ids, ambiguous, ref_weights = reference(
        x.cpu(), w.cpu(), None if bias is None else bias.cpu(), top_k, score_func, norm, n_group,
        topk_group, scale,
    )  # fmt: skip
    tol = _tol(x.dtype)
    torch.testing.assert_close(logits.cpu().double(), ref_logits, atol=tol, rtol=tol)
    ids = ids.cpu()
    if strict_ties:
        ambiguous = torch.zeros_like(ambiguous)
    # Random data rarely has near ties; a broken selection must not hide behind them.
    assert ambiguous.float().mean() <= 0.1
    mismatch = (ids.long() != ref_ids).any(-1)
    assert not (mismatch & ~ambiguous).any(), (ids[mismatch], ref_ids[mismatch])
    assert (ids.sort(-1).values[:, 1:] != ids.sort(-1).values[:, :-1]).all(), "duplicate experts"
    torch.testing.assert_close(wts.cpu().double(), ref_weights(ids), atol=tol, rtol=tol)
    return logits, ids, wts


def make_inputs(N, D, E, dtype, device, bias):
    x = torch.randn(N, D, device=device).to(dtype)
    w = (torch.randn(E, D, device=device) / D**0.5).to(dtype)
    b = None
    if bias:
        bdt = torch.float64 if dtype == torch.float64 else torch.float32
        b = (0.1 * torch.randn(E, device=device)).to(bdt)
    return x, w, b


# (E, top_k, score_func, bias, n_group, topk_group, norm, scale, D)
CONFIGS = [
    (8, 2, "softmax", False, None, None, True, 1.0, 40),  # Mixtral-like
    (12, 3, "sigmoid", True, 4, 2, True, 2.5, 72),  # DeepSeek-V3-like, group size 3
    (6, 4, "sigmoid", False, None, None, False, 0.7, 40),  # E not a power of two
    (8, 3, "softmax", True, 4, 3, False, 1.3, 24),
    (6, 2, "sigmoid", True, 6, 3, True, 1.0, 40),  # groups of one expert: group score = top-1
    (9, 3, "softmax", False, 3, 1, True, 1.0, 40),  # one kept group supplies all top_k
    (1, 1, "softmax", False, None, None, True, 1.0, 40),
    (1, 1, "sigmoid", True, None, None, False, 2.0, 40),
    (5, 5, "softmax", True, None, None, False, 1.0, 40),  # top_k == E
    (5, 5, "sigmoid", False, 5, 5, True, 1.0, 40),  # top_k == E with groups
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"E{c[0]}k{c[1]}{c[2]}b{int(c[3])}g{c[4]}")
def test_route_forward(impl, device, cfg, dtype):
    E, top_k, score_func, bias, n_group, topk_group, norm, scale, D = cfg
    x, w, b = make_inputs(37, D, E, dtype, device, bias)
    check_route(x, w, b, top_k, score_func, norm, n_group, topk_group, scale)


def test_route_forward_fp16(impl, device):
    x, w, b = make_inputs(21, 40, 12, torch.float16, device, True)
    check_route(x, w, b, 4, "sigmoid", True, 4, 2, 2.5)


@pytest.mark.parametrize("N", [1, 150])
def test_route_forward_token_counts(impl, device, N):
    """A single token, and more tokens than one program's block."""
    for _ in range(10):  # redraw the rare input whose lone token has a near tie (its ids would go unchecked)
        x, w, b = make_inputs(N, 24, 16, torch.float32, device, True)
        if reference(x.cpu(), w.cpu(), b.cpu(), 4, "sigmoid", True, 4, 2, 1.5)[2].float().mean() <= 0.1:
            break
    check_route(x, w, b, 4, "sigmoid", True, 4, 2, 1.5)


@pytest.mark.parametrize("n", [37, 0])
def test_route_forward_into_out(impl, device, n):
    x, w, b = make_inputs(n, 24, 8, torch.float32, device, True)
    want = routing.route_forward(x, w, b, 3, "sigmoid", True, 4, 2, 1.5)
    nan = float("nan")
    out = (torch.full((n, 8), nan, device=device), None, torch.full((n, 3), nan, device=device))
    got = routing.route_forward(x, w, b, 3, "sigmoid", True, 4, 2, 1.5, logits_out=out[0], weights_out=out[2])
    assert got[0] is out[0] and got[2] is out[2]
    for g, wt in zip(got, want, strict=True):
        assert torch.equal(g, wt)
    bad = torch.empty(n, 3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"ids_out must be a contiguous"):
        routing.route_forward(x, w, b, 3, "sigmoid", True, 4, 2, 1.5, ids_out=bad)


def test_route_forward_no_tokens(impl, device):
    x, w, b = make_inputs(0, 24, 8, torch.float32, device, True)
    logits, ids, wts = routing.route_forward(x, w, b, 2, "softmax", True, None, None, 1.0)
    assert logits.shape == (0, 8) and ids.shape == (0, 2) and wts.shape == (0, 2)
    assert ids.dtype == torch.int32 and wts.dtype == torch.float32


@pytest.mark.parametrize("groups", [(None, None), (4, 1), (4, 3)])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_forward_exact_ties(impl, device, score_func, groups):
    """Equal selection scores go to the lower expert index, equal group scores to the lower group.

    0/1 inputs make logits small exact integers (identical on every backend); duplicated router
    rows give identical logits. Groups 0 and 1 (and groups 2 and 3) hold the same logits and
    bias, so their group scores always tie; (4, 1) and (4, 3) put those ties at the keep/drop
    boundary. With non-negative logits and a bias constant within each group, exactly equal
    fp64 selection scores / group sums only come from equal (logit, bias) multisets, which give
    bitwise equal fp32 results too (a per-expert bias could pair terms differently in two
    mathematically equal group sums, and rounding would break the tie).
    """
    N, D, E = 48, 8, 12
    x = torch.randint(0, 2, (N, D), device=device).float()
    w = torch.randint(0, 2, (E, D), device=device).float()
    w[2] = w[1]
    for dup, src in ((3, 2), (4, 0), (5, 1), (9, 8), (10, 6), (11, 7)):
        w[dup] = w[src]
    group_bias = torch.randint(-2, 2, (4,), device=device).float() * 0.25
    group_bias[:2] = 0.5
    group_bias[3] = group_bias[2]
    bias = group_bias.repeat_interleave(3)
    n_group, topk_group = groups
    _, ids, _ = check_route(x, w, bias, 3, score_func, True, n_group, topk_group, 1.0, strict_ties=True)
    # The test must meet ties: some chosen expert has a twin with exactly its selection score.
    sel = (ref_scores(x.cpu().double() @ w.cpu().double().T, score_func) + bias.cpu().double()).tolist()
    assert any(
        sel[n][e] == sel[n][o] for n, row in enumerate(ids.tolist()) for e in row for o in range(E) if o != e
    )


def test_route_forward_rejects_bad_arguments(device):
    x, w, _ = make_inputs(4, 8, 12, torch.float32, device, False)
    with pytest.raises(ValueError):
        routing.route_forward(x, w, None, 2, "relu", True, None, None, 1.0)
    with pytest.raises(ValueError):
        routing.route_forward(x, w, None, 2, "softmax", True, 5, 2, 1.0)  # 12 % 5 != 0
    with pytest.raises(ValueError):
        routing.route_forward(x, w, None, 2, "softmax", True, 4, None, 1.0)
    with pytest.raises(ValueError):
        routing.route_forward(x, w, None, 7, "softmax", True, 4, 2, 1.0)  # 2 groups of 3 < 7
    with pytest.raises(ValueError):
        routing.route_forward(x, w, None, 13, "softmax", True, None, None, 1.0)


def ref_backward(logits, ids, grad_w_row, assign_to_row, ext, score_func, norm, scale):
    """Autograd through the float64 weight formula, ids fixed."""
    N, K = ids.shape
    lg = logits.detach().cpu().double().requires_grad_(True)
    r = ref_scores(lg, score_func).gather(1, ids.cpu().long())
    wts = r / r.sum(-1, keepdim=True) if norm else r
    wts = wts * scale
    g = torch.zeros(N, K, dtype=torch.float64)
    for a, row in enumerate(assign_to_row.tolist()):
        if row >= 0:
            g[a // K, a % K] = float(grad_w_row[row])
    loss = (wts * g).sum()
    if ext is not None:
        loss = loss + (lg * ext.cpu().double()).sum()
    loss.backward()
    return lg.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ext", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_backward(impl, device, score_func, norm, ext, dtype):
    N, E, K = 29, 12, 3
    R = N * K + 7  # some rows are padding
    logits = (2 * torch.randn(N, E, device=device)).to(dtype)
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(N)]).int()
    assign_to_row = torch.randperm(R, device=device)[: N * K].int()
    assign_to_row[torch.rand(N * K, device=device) < 0.2] = -1  # dropped assignments
    grad_w_row = torch.randn(R, device=device).to(dtype)
    grad_ext = torch.randn(N, E, device=device).to(dtype) if ext else None
    scale = 2.5

    got = routing.route_backward(logits, ids, grad_w_row, assign_to_row, grad_ext, score_func, norm, scale)
    assert got.shape == (N, E) and got.dtype == dtype
    want = ref_backward(logits, ids, grad_w_row, assign_to_row, grad_ext, score_func, norm, scale)
    tol = _tol(dtype)
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


def test_route_backward_all_dropped_and_empty(impl, device):
    N, E, K = 5, 6, 2
    logits = torch.randn(N, E, device=device)
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(N)]).int()
    assign_to_row = torch.full((N * K,), -1, dtype=torch.int32, device=device)
    grad_w_row = torch.randn(N * K, device=device)
    got = routing.route_backward(logits, ids, grad_w_row, assign_to_row, None, "softmax", True, 1.0)
    assert torch.equal(got.cpu(), torch.zeros(N, E))
    empty = routing.route_backward(
        logits[:0], ids[:0], grad_w_row[:0], assign_to_row[:0], None, "sigmoid", False, 1.0
    )
    assert empty.shape == (0, E)


def test_route_forward_backward_consistent(impl, device):
    """route_backward of route_forward's own outputs matches autograd of the torch reference."""
    x, w, b = make_inputs(17, 24, 8, torch.float64, device, True)
    logits, ids, _ = routing.route_forward(x, w, b, 3, "sigmoid", True, 4, 2, 1.7)
    N, K = ids.shape
    assign_to_row = torch.arange(N * K, device=device, dtype=torch.int32)
    grad_w_row = torch.randn(N * K, device=device, dtype=torch.float64)
    got = routing.route_backward(logits, ids, grad_w_row, assign_to_row, None, "sigmoid", True, 1.7)
    want = ref_backward(logits, ids, grad_w_row, assign_to_row, None, "sigmoid", True, 1.7)
    torch.testing.assert_close(got.cpu(), want, atol=TOL_FP64, rtol=TOL_FP64)


def test_route_backward_low_precision_out(impl, device):
    N, E, K = 40, 8, 2
    logits = 2 * torch.randn(N, E, device=device)
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(N)]).int()
    assign_to_row = torch.arange(N * K, device=device, dtype=torch.int32)
    grad_w_row = torch.randn(N * K, device=device)
    plain = routing.route_backward(logits, ids, grad_w_row, assign_to_row, None, "softmax", True, 1.0)
    got = routing.route_backward(logits, ids, grad_w_row, assign_to_row, None, "softmax", True, 1.0,
                                 out_dtype=torch.bfloat16)
    assert plain.dtype == torch.float32 and got.dtype == torch.bfloat16
    # computed in fp32, one bf16 rounding at the store (the interpreter truncates): within 2^-7
    assert bool(((got.float() - plain).abs() <= 2.0**-7 * plain.abs()).all())
