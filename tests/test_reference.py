"""Tests of the unfused reference MoE against a per-token Python-loop oracle.

The oracle does the routing in Python floats, token by token, and the expert math with
per-token mat-vecs, so it shares no code shape with ``moe_reference`` (per-expert batches).
Both run in float64: they differ only by summation order (~1e-15 relative), hence ``TIGHT``.
"""

import math

import pytest
import torch

from flashfusemoe.reference import moe_reference

# fp64 vs fp64 with different summation orders: errors ~1e-15, so 1e-10 can only fail on a bug.
TIGHT = dict(rtol=1e-10, atol=1e-12)
F64 = torch.float64


def _act(g, activation):
    if activation == "swiglu":
        return g / (1 + torch.exp(-g))
    if activation == "geglu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return torch.clamp(g, min=0) * torch.clamp(g, min=0)


def _mlp(xn, w_up, w_down, activation):
    f = w_up.shape[0] // 2
    return w_down @ (_act(w_up[:f] @ xn, activation) * (w_up[f:] @ xn))


def oracle(x, router_weight, w_up, w_down, top_k, **cfg):
    """Per-token loop. Returns ``(out [N, D], info)``; ``info`` has counts, dropped, losses, margin.

    ``margin`` is the smallest gap at any selection boundary (top-k, groups, capacity).
    """
    activation = cfg.get("activation", "swiglu")
    bias = cfg.get("expert_bias")
    n_group, topk_group = cfg.get("n_group"), cfg.get("topk_group")
    xs = x.reshape(-1, x.shape[-1])
    n_tok, e_num = xs.shape[0], router_weight.shape[0]
    X, R = xs.tolist(), router_weight.tolist()
    ids, wts, lses, probs = [], [], [], []
    margin = math.inf
    for n in range(n_tok):
        logits = [sum(a * b for a, b in zip(X[n], R[e], strict=True)) for e in range(e_num)]
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        lses.append(m + math.log(z))
        if cfg.get("score_func", "softmax") == "softmax":
            scores = [math.exp(v - m) / z for v in logits]
            probs.append(scores)
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
            probs.append([s / sum(scores) for s in scores])
        sel = [s + (bias[e].item() if bias is not None else 0.0) for e, s in enumerate(scores)]
        allowed = list(range(e_num))
        if n_group is not None:
            size = e_num // n_group
            gs = [sum(sorted(sel[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
            granked = sorted(range(n_group), key=lambda g: (-gs[g], g))
            if topk_group < n_group:
                margin = min(margin, gs[granked[topk_group - 1]] - gs[granked[topk_group]])
            allowed = [e for e in allowed if e // size in granked[:topk_group]]
        ranked = sorted(allowed, key=lambda e: (-sel[e], e))
        if len(ranked) > top_k:
            margin = min(margin, sel[ranked[top_k - 1]] - sel[ranked[top_k]])
        chosen = ranked[:top_k]
        w = [scores[e] for e in chosen]
        if cfg.get("norm_topk_prob", True):
            w = [v / sum(w) for v in w]
        ids.append(chosen)
        wts.append([v * cfg.get("routed_scaling_factor", 1.0) for v in w])

    kept = [[True] * top_k for _ in range(n_tok)]
    counts = [sum(row.count(e) for row in ids) for e in range(e_num)]
    if cfg.get("capacity_factor") is not None:
        cap = math.ceil(cfg["capacity_factor"] * n_tok * top_k / e_num)
        for e in range(e_num):
            mine = [(n, k) for n in range(n_tok) for k in range(top_k) if ids[n][k] == e]
            mine.sort(key=lambda nk: (-wts[nk[0]][nk[1]], nk[0]))
            if len(mine) > cap:
                margin = min(
                    margin, wts[mine[cap - 1][0]][mine[cap - 1][1]] - wts[mine[cap][0]][mine[cap][1]]
                )
            for n, k in mine[cap:]:
                kept[n][k] = False

    out = torch.zeros_like(xs)
    for n in range(n_tok):
        for k in range(top_k):
            if kept[n][k]:
                e = ids[n][k]
                out[n] += wts[n][k] * _mlp(xs[n], w_up[e], w_down[e], activation)
        if cfg.get("shared_w_up") is not None:
            s = _mlp(xs[n], cfg["shared_w_up"], cfg["shared_w_down"], activation)
            if cfg.get("shared_gate_weight") is not None:
                s = s / (1 + math.exp(-(cfg["shared_gate_weight"][0] @ xs[n]).item()))
            out[n] += s
    p_mean = [sum(p[e] for p in probs) / n_tok for e in range(e_num)]
    info = dict(
        counts=counts,
        dropped=sum(not v for row in kept for v in row),
        lb=e_num * sum(counts[e] / n_tok * p_mean[e] for e in range(e_num)),
        z=sum(v * v for v in lses) / n_tok,
        margin=margin,
    )
    return out.reshape(x.shape), info


def make(n=8, d=6, e=8, f=4, dtype=F64, lead=None, shared=False, gate=False, bias=False):
    """Random inputs of ``moe_reference``: ``(args, cfg)``, outputs of order 1."""
    x = torch.randn(*(lead or (n,)), d, dtype=dtype)
    args = [
        x,
        torch.randn(e, d, dtype=dtype),
        torch.randn(e, 2 * f, d, dtype=dtype) / math.sqrt(d),
        torch.randn(e, d, f, dtype=dtype) / math.sqrt(f),
    ]
    cfg = {}
    if shared:
        cfg["shared_w_up"] = torch.randn(2 * f, d, dtype=dtype) / math.sqrt(d)
        cfg["shared_w_down"] = torch.randn(d, f, dtype=dtype) / math.sqrt(f)
    if gate:
        cfg["shared_gate_weight"] = torch.randn(1, d, dtype=dtype)
    if bias:
        cfg["expert_bias"] = 0.3 * torch.randn(e, dtype=dtype)
    return args, cfg


CASES = {
    "swiglu": dict(),
    "geglu": dict(activation="geglu"),
    "relu2": dict(activation="relu2"),
    "softmax_nonorm": dict(norm_topk_prob=False),
    "sigmoid": dict(score_func="sigmoid"),
    "sigmoid_nonorm": dict(score_func="sigmoid", norm_topk_prob=False),
    "bias_softmax": dict(bias=True),
    "bias_sigmoid": dict(score_func="sigmoid", bias=True),
    "groups": dict(n_group=4, topk_group=2),
    "groups_1expert": dict(n_group=8, topk_group=3, top_k=3),
    "dsv3": dict(score_func="sigmoid", bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "scaling": dict(routed_scaling_factor=2.5),
    "capacity_overflow": dict(capacity_factor=0.5),
    "capacity_k3": dict(capacity_factor=1.0, top_k=3, activation="relu2"),
    "shared": dict(shared=True),
    "shared_gate": dict(shared=True, gate=True, activation="geglu"),
    "leading_dims": dict(lead=(2, 4)),
    "top1": dict(top_k=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_per_token_oracle(name):
    case = dict(CASES[name])
    top_k = case.pop("top_k", 2)
    make_kw = {k: case.pop(k) for k in ("shared", "gate", "bias", "lead") if k in case}
    args, cfg = make(**make_kw)
    cfg.update(case)
    out, aux = moe_reference(*args, top_k, return_aux=True, **cfg)
    expect, info = oracle(*args, top_k, **cfg)
    assert out.shape == args[0].shape and out.dtype == F64
    torch.testing.assert_close(out, expect, **TIGHT)
    assert aux["tokens_per_expert"].tolist() == info["counts"]
    assert aux["dropped_tokens"].item() == info["dropped"]
    if name == "capacity_overflow":
        # C = ceil(0.5 * 8 * 2 / 8) = 1 for 16 assignments over 8 experts: at least 8 dropped.
        assert info["dropped"] >= 8


def test_capacity_ties_keep_lower_tokens():
    """Identical tokens tie on every weight: an expert keeps the first C of them."""
    n, d, e, f = 6, 4, 4, 3
    x = torch.randint(-2, 3, (1, d), dtype=F64).expand(n, d).contiguous()
    router = torch.randint(-2, 3, (e, d), dtype=F64)  # integers: logits exact, equal across tokens
    w_up = torch.randn(e, 2 * f, d, dtype=F64)
    w_down = torch.randn(e, d, f, dtype=F64)
    out, aux = moe_reference(x, router, w_up, w_down, 1, capacity_factor=1.0, return_aux=True)
    cap = math.ceil(1.0 * n * 1 / e)  # 2
    full = moe_reference(x, router, w_up, w_down, 1)
    torch.testing.assert_close(out[:cap], full[:cap], **TIGHT)
    assert torch.all(out[cap:] == 0)
    assert aux["dropped_tokens"].item() == n - cap
    assert aux["tokens_per_expert"].max().item() == n


def _exact_logit_inputs(c, n=5, d=3, f=3):
    """Tokens ``e_0`` and a router whose column 0 is ``c``: every token's logits are exactly ``c``."""
    e = len(c)
    x = torch.zeros(n, d, dtype=F64)
    x[:, 0] = 1
    router = torch.randn(e, d, dtype=F64)
    router[:, 0] = torch.tensor(c, dtype=F64)
    return x, router, torch.randn(e, 2 * f, d, dtype=F64), torch.randn(e, d, f, dtype=F64)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_ties_go_to_lower_expert(score_func):
    e = 8
    lo, hi = sorted(torch.randperm(e)[:2].tolist())
    c = [0.0] * e
    c[lo] = c[hi] = 3.0  # tied best experts
    args = _exact_logit_inputs(c)
    n = args[0].shape[0]
    out, aux = moe_reference(*args, 1, score_func=score_func, return_aux=True)
    expect = torch.zeros(e, dtype=torch.int64)
    expect[lo] = n
    assert torch.equal(aux["tokens_per_expert"], expect)
    torch.testing.assert_close(out, oracle(*args, 1, score_func=score_func)[0], **TIGHT)

    # All scores equal: experts 0..k-1.
    args = _exact_logit_inputs([1.0] * e)
    _, aux = moe_reference(*args, 3, score_func=score_func, return_aux=True)
    assert aux["tokens_per_expert"].tolist() == [n] * 3 + [0] * (e - 3)


def test_group_ties_go_to_lower_group():
    # Groups of 2 with score pairs {s2, s1}, {s2, s1}, {s0, s0}, {s2, s1}: groups 0, 1 and 3 tie
    # and 0, 1 are kept; top-3 within them: experts 1, 2 (s2), then 0 before 3 (s1 tie).
    # Without groups: 1, 2, 6.
    c = [1.0, 2.0, 2.0, 1.0, 0.0, 0.0, 2.0, 1.0]
    args = _exact_logit_inputs(c)
    n = args[0].shape[0]
    for groups, chosen in (({"n_group": 4, "topk_group": 2}, (0, 1, 2)), ({}, (1, 2, 6))):
        out, aux = moe_reference(*args, 3, return_aux=True, **groups)
        expect = torch.zeros(8, dtype=torch.int64)
        expect[list(chosen)] = n
        assert torch.equal(aux["tokens_per_expert"], expect), groups
        torch.testing.assert_close(out, oracle(*args, 3, **groups)[0], **TIGHT)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_losses(score_func):
    args, _ = make(n=10, e=4)
    x, router = args[0].requires_grad_(), args[1].requires_grad_()
    cfg = dict(score_func=score_func, capacity_factor=0.75)
    _, aux = moe_reference(*args, 2, return_aux=True, **cfg)
    _, info = oracle(*args, 2, **cfg)
    assert aux["tokens_per_expert"].dtype == torch.int64 and aux["tokens_per_expert"].shape == (4,)
    assert aux["dropped_tokens"].dtype == torch.int64 and aux["dropped_tokens"].dim() == 0
    assert aux["dropped_tokens"].item() == info["dropped"] > 0
    torch.testing.assert_close(aux["load_balance_loss"], torch.tensor(info["lb"], dtype=F64), **TIGHT)
    torch.testing.assert_close(aux["z_loss"], torch.tensor(info["z"], dtype=F64), **TIGHT)

    # Gradients: P through the full distribution, counts constant.
    logits = x @ router.T
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    probs = scores / scores.sum(-1, keepdim=True)
    counts = torch.tensor(info["counts"], dtype=F64)
    lb = 4 * (counts / 10 * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    for got, want in ((aux["load_balance_loss"], lb), (aux["z_loss"], z)):
        g_got = torch.autograd.grad(got, (x, router), retain_graph=True)
        g_want = torch.autograd.grad(want, (x, router), retain_graph=True)
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


GRAD_CASES = {
    "softmax": dict(),
    "sigmoid_bias_groups_scale": dict(
        score_func="sigmoid",
        bias=True,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.0,
        activation="geglu",
    ),
    "capacity_nonorm": dict(capacity_factor=0.5, norm_topk_prob=False, activation="relu2"),
    "shared_gate": dict(shared=True, gate=True),
}


def _far_from_ties(top_k, **kw):
    """Inputs whose every selection boundary has a gap > 1e-3, so finite differences (eps 1e-6)
    cannot flip a choice."""
    make_kw = {k: kw.pop(k) for k in ("shared", "gate", "bias") if k in kw}
    for _ in range(200):
        args, cfg = make(n=4, d=3, e=4, f=2, **make_kw)
        cfg.update(kw)
        if oracle(*args, top_k, **cfg)[1]["margin"] > 1e-3:
            return args, cfg
    raise AssertionError("no well-separated inputs found")


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(name):
    args, cfg = _far_from_ties(2, **GRAD_CASES[name])
    tensors = {k: v for k, v in cfg.items() if isinstance(v, torch.Tensor) and k != "expert_bias"}
    rest = {k: v for k, v in cfg.items() if k not in tensors}
    keys = list(tensors)
    inputs = [t.clone().requires_grad_() for t in [*args, *tensors.values()]]

    def fn(x, router, w_up, w_down, *extra):
        out, aux = moe_reference(
            x, router, w_up, w_down, 2, return_aux=True, **rest, **dict(zip(keys, extra, strict=True))
        )
        return out, aux["load_balance_loss"], aux["z_loss"]

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "dtype,tol",
    [
        # Each expert output passes three roundings to the input dtype (h, a, y) plus the rounded
        # weight products; with outputs of order 1 and K=2 terms, that stays below ~6 ulp-relative
        # units of the output scale: 6 * 2^-8 = 2.3e-2 (bf16), 6 * 2^-11 = 2.9e-3 (fp16).
        # fp32 (2^-24 per op, D <= 64 long sums, routing in fp32): 1e-5.
        (torch.bfloat16, 2.5e-2),
        (torch.float16, 3e-3),
        (torch.float32, 1e-5),
    ],
)
def test_low_precision_close_to_fp64(dtype, tol):
    # Routing runs in fp32 on the same (exactly upcast) inputs as the fp64 reference, so only
    # fp32 arithmetic can flip a top-k or capacity choice. The router is scaled by 1/sqrt(D)
    # (exact: 1/8) so logits are O(1) and the scores do not saturate. fp32 logit error is at most
    # eps = D * 2^-24 * max_ne sum_i |x_ni r_ei| <= 3.8e-6 * 9 = 3.4e-5 (that sum: mean 5, std 0.8).
    # A score gap g bounds the relative gap of the two exps from below, and a capacity weight
    # sigmoid(l_a - l_b) moves by at most eps (+ a few ulp): both need g > 2 * eps + O(2^-24),
    # about 7e-5. A margin of 1e-3 leaves a >10x cushion; about half of the draws qualify.
    margin, tries, seen = 1e-3, 100, []
    d = 64
    for _ in range(tries):
        args, cfg = make(n=32, d=d, e=8, f=32, dtype=dtype, shared=True, gate=True)
        args[1] = args[1] / math.sqrt(d)
        cfg["capacity_factor"] = 1.0
        args64 = [a.double() for a in args]
        cfg64 = {k: v.double() for k, v in cfg.items() if isinstance(v, torch.Tensor)}
        cfg64["capacity_factor"] = 1.0
        seen.append(oracle(*args64, 2, **cfg64)[1]["margin"])
        if seen[-1] > margin:
            break
    else:
        pytest.fail(f"no draw in {tries} has a selection margin > {margin} (best {max(seen):.3g})")
    inputs = [a.clone().requires_grad_() for a in args]
    out = moe_reference(*inputs, 2, **cfg)
    assert out.dtype == dtype and out.shape == args[0].shape
    inputs64 = [a.clone().requires_grad_() for a in args64]
    ref = moe_reference(*inputs64, 2, **cfg64)
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() <= tol * scale

    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for a, b in zip(inputs, inputs64, strict=True):
        assert a.grad.dtype == dtype
        # The backward adds the same number of roundings again: twice the forward tolerance.
        assert (a.grad.double() - b.grad).abs().max() <= 2 * tol * b.grad.abs().max()
