"""jax_bridge.reference: the dense JAX ground truth and the ragged_dot baseline.

The ground truth is checked against a per-token numpy float64 loop written from the routing
semantics of docs/design.md.
"""

import math

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jax_bridge.reference import moe_reference, ragged_dot_moe, route_reference  # noqa: E402

N_SHAPE, D, E, F = (3, 4), 8, 8, 6  # 12 tokens
N = math.prod(N_SHAPE)

# fp64 end to end: only summation order differs, errors are ~1e-15 at unit scale.
TOL64 = dict(rtol=1e-11, atol=1e-11)
# fp32 vs an fp64 loop: a few roundings of eps32 = 1.2e-7 through softmax and three chained
# contractions of length <= 12 stay under 1e-5 at unit-scale values.
TOL32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def rng():
    # Derived from the torch seed that conftest sets (and reports) per test.
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


@pytest.fixture
def x64():
    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def make_inputs(rng, *, shared=False, gate=False, bias=False, e=E):
    p = {
        "x": rng.standard_normal((*N_SHAPE, D)),
        "router_weight": rng.standard_normal((e, D)) * 0.5,
        "w_up": rng.standard_normal((e, 2 * F, D)) / math.sqrt(D),
        "w_down": rng.standard_normal((e, D, F)) / math.sqrt(F),
    }
    if bias:
        p["expert_bias"] = rng.standard_normal(e) * 0.1
    if shared:
        p["shared_w_up"] = rng.standard_normal((2 * 4, D)) / math.sqrt(D)
        p["shared_w_down"] = rng.standard_normal((D, 4)) / 2.0
    if gate:
        p["shared_gate_weight"] = rng.standard_normal((1, D)) * 0.5
    return p


def to_jax(p, dtype):
    return {
        k: jnp.asarray(v, dtype=jnp.float32 if k == "expert_bias" and dtype != jnp.float64 else dtype)
        for k, v in p.items()
    }


# ---- independent float64 loop ----------------------------------------------------------------


def np_act(h, activation):
    if activation == "swiglu":
        return h / (1.0 + np.exp(-h))
    if activation == "geglu":
        return 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    return np.maximum(h, 0.0) ** 2


def np_expert(xn, wu, wd, activation):
    f = wu.shape[0] // 2
    h = wu @ xn
    return wd @ (np_act(h[:f], activation) * h[f:])


def np_moe(
    p,
    top_k,
    *,
    activation="swiglu",
    score_func="softmax",
    norm_topk_prob=True,
    n_group=None,
    topk_group=None,
    routed_scaling_factor=1.0,
    capacity_factor=None,
):
    """Returns out [N, D], ids [N, K], weights [N, K], kept [N, K] and the aux values."""
    x = p["x"].reshape(-1, D).astype(np.float64)
    rw = p["router_weight"]
    n, e = x.shape[0], rw.shape[0]
    ids = np.zeros((n, top_k), np.int64)
    wts = np.zeros((n, top_k))
    logits = np.zeros((n, e))
    for t in range(n):
        lg = rw @ x[t]
        logits[t] = lg
        if score_func == "softmax":
            s = np.exp(lg - lg.max())
            s = s / s.sum()
        else:
            s = 1.0 / (1.0 + np.exp(-lg))
        sel = s + p["expert_bias"] if "expert_bias" in p else s
        allowed = list(range(e))
        if n_group is not None:
            gs = e // n_group
            gscore = [sum(sorted(sel[g * gs : (g + 1) * gs], reverse=True)[:2]) for g in range(n_group)]
            groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
            allowed = [ex for ex in range(e) if ex // gs in groups]
        chosen = sorted(allowed, key=lambda ex: (-sel[ex], ex))[:top_k]
        w = s[chosen]
        if norm_topk_prob:
            w = w / w.sum()
        ids[t], wts[t] = chosen, w * routed_scaling_factor
    kept = np.ones((n, top_k), bool)
    if capacity_factor is not None:
        cap = math.ceil(capacity_factor * n * top_k / e)
        for ex in range(e):
            assigned = [(t, j) for t in range(n) for j in range(top_k) if ids[t, j] == ex]
            assigned.sort(key=lambda a: (-wts[a], a[0]))
            for a in assigned[cap:]:
                kept[a] = False
    out = np.zeros((n, D))
    for t in range(n):
        for j in range(top_k):
            if kept[t, j]:
                ex = ids[t, j]
                out[t] += wts[t, j] * np_expert(x[t], p["w_up"][ex], p["w_down"][ex], activation)
        if "shared_w_up" in p:
            ys = np_expert(x[t], p["shared_w_up"], p["shared_w_down"], activation)
            if "shared_gate_weight" in p:
                ys = ys / (1.0 + np.exp(-(p["shared_gate_weight"][0] @ x[t])))
            out[t] += ys
    tpe = np.bincount(ids.reshape(-1), minlength=e)
    if score_func == "softmax":
        probs = np.exp(logits - logits.max(-1, keepdims=True))
    else:
        probs = 1.0 / (1.0 + np.exp(-logits))
    probs = probs / probs.sum(-1, keepdims=True)
    m = logits.max(-1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    aux = {
        "load_balance_loss": e * np.sum(tpe / n * probs.mean(0)),
        "z_loss": np.mean(lse**2),
        "tokens_per_expert": tpe,
        "dropped_tokens": int((~kept).sum()),
    }
    return out, ids, wts, kept, aux


# ---- (a) ground truth vs the loop --------------------------------------------------------------

CONFIGS = {
    "swiglu-softmax": dict(top_k=2),
    "geglu-sigmoid-bias-scale": dict(
        top_k=2, activation="geglu", score_func="sigmoid", bias=True, routed_scaling_factor=2.5
    ),
    "relu2-softmax-nonorm-shared": dict(top_k=3, activation="relu2", norm_topk_prob=False, shared=True),
    "groups-sigmoid-bias": dict(
        top_k=3, score_func="sigmoid", bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5
    ),
    "groups-of-one-nonorm": dict(top_k=2, activation="geglu", n_group=8, topk_group=3, norm_topk_prob=False),
    "capacity": dict(top_k=2, capacity_factor=0.5),
    "capacity-groups-sigmoid": dict(
        top_k=3,
        score_func="sigmoid",
        bias=True,
        n_group=4,
        topk_group=2,
        capacity_factor=0.75,
        activation="relu2",
    ),
    "shared-gated-capacity": dict(top_k=2, shared=True, gate=True, capacity_factor=0.5),
}


def split_cfg(cfg):
    cfg = dict(cfg)
    flags = {k: cfg.pop(k, False) for k in ("shared", "gate", "bias")}
    return cfg, flags


def check_against_loop(rng, cfg, dtype, tol):
    kw, flags = split_cfg(cfg)
    p = make_inputs(rng, **flags)
    ref_out, ref_ids, ref_w, ref_kept, ref_aux = np_moe(p, **kw)
    if "capacity_factor" in kw:
        assert ref_aux["dropped_tokens"] > 0  # the config must overflow some expert

    j = to_jax(p, dtype)
    out, aux = jax.jit(lambda j: moe_reference(**j, **kw, return_aux=True))(j)
    assert out.dtype == dtype and out.shape == (*N_SHAPE, D)
    np.testing.assert_allclose(np.asarray(out).reshape(N, D), ref_out, **tol)

    routing = route_reference(
        j["x"],
        j["router_weight"],
        kw["top_k"],
        expert_bias=j.get("expert_bias"),
        **{k: v for k, v in kw.items() if k not in ("top_k", "activation")},
    )
    np.testing.assert_array_equal(np.asarray(routing.topk_ids), ref_ids)
    np.testing.assert_array_equal(np.asarray(routing.kept), ref_kept)
    np.testing.assert_allclose(np.asarray(routing.topk_weights), ref_w, **tol)

    assert aux["tokens_per_expert"].dtype == jnp.int32 and aux["dropped_tokens"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), ref_aux["tokens_per_expert"])
    assert int(aux["dropped_tokens"]) == ref_aux["dropped_tokens"]
    for key in ("load_balance_loss", "z_loss"):
        np.testing.assert_allclose(float(aux[key]), ref_aux[key], **tol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_float64_loop(rng, x64, name):
    check_against_loop(rng, CONFIGS[name], jnp.float64, TOL64)


@pytest.mark.parametrize("name", ["groups-sigmoid-bias", "shared-gated-capacity"])
def test_float32_matches_float64_loop(rng, name):
    check_against_loop(rng, CONFIGS[name], jnp.float32, TOL32)


FD_EPS = 1e-6  # central-difference step of the gradient test
TIE_MARGIN = 100 * FD_EPS  # routing must stay put this far along each direction, both ways


def draw_far_from_ties(rng, kw, tries=20):
    """Inputs, cotangent and directions for the finite-difference test, away from routing ties.

    Top-k ids and capacity's kept mask are piecewise constant in x and router_weight (the only
    inputs that reach routing): a draw within FD_EPS of a flip makes the central difference
    jump. Draws whose decisions change within +-TIE_MARGIN along their direction are redrawn.
    """
    route_kw = {k: v for k, v in kw.items() if k != "activation"}

    @jax.jit
    def decisions(q, bias):
        r = route_reference(q["x"], q["router_weight"], expert_bias=bias, **route_kw)
        return r.topk_ids, r.kept

    for _ in range(tries):
        p = to_jax(make_inputs(rng, shared=True, gate=True, bias=True), jnp.float64)
        bias = p.pop("expert_bias")
        ct = jnp.asarray(rng.standard_normal((*N_SHAPE, D)))
        dirs = {name: jnp.asarray(rng.standard_normal(p[name].shape)) for name in p}
        base = decisions(p, bias)
        moved = [
            decisions({**p, name: p[name] + step * dirs[name]}, bias)
            for name in ("x", "router_weight")
            for step in (TIE_MARGIN, -TIE_MARGIN)
        ]
        if all(np.array_equal(b, m) for dec in moved for b, m in zip(base, dec, strict=True)):
            return p, bias, ct, dirs
    raise RuntimeError(
        f"no draw in {tries} tries keeps its routing within {TIE_MARGIN:g} along its directions"
    )


def test_gradient_matches_finite_differences(rng, x64):
    """Directional derivative of <out, ct> for every differentiable input, all features on."""
    kw = dict(
        top_k=3,
        score_func="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        capacity_factor=0.75,
        activation="geglu",
    )
    p, bias, ct, dirs = draw_far_from_ties(rng, kw)
    f = jax.jit(lambda q: jnp.sum(moe_reference(**q, **kw, expert_bias=bias) * ct))
    grads = jax.grad(f)(p)
    for name, v in dirs.items():
        eps = FD_EPS
        fd = (f({**p, name: p[name] + eps * v}) - f({**p, name: p[name] - eps * v})) / (2 * eps)
        # Central differences: truncation ~eps^2, cancellation ~1e-16/eps = 1e-10; routing is
        # constant on the segment (draw_far_from_ties).
        np.testing.assert_allclose(
            float(jnp.vdot(grads[name], v)), float(fd), rtol=1e-6, atol=1e-8, err_msg=name
        )


# ---- (b) ties -------------------------------------------------------------------------------------


def test_ties_go_to_lower_expert_group_and_token(rng, x64):
    p = make_inputs(rng)
    p["router_weight"] = np.zeros((E, D))  # every score equal
    kw = dict(top_k=3, n_group=4, topk_group=2, capacity_factor=0.5)
    routing = route_reference(jnp.asarray(p["x"]), jnp.asarray(p["router_weight"]), **kw)
    np.testing.assert_array_equal(np.asarray(routing.topk_ids), np.tile([0, 1, 2], (N, 1)))
    cap = math.ceil(0.5 * N * 3 / E)
    np.testing.assert_array_equal(np.asarray(routing.kept), np.arange(N)[:, None] < cap + np.zeros((1, 3)))
    ref_out, ref_ids, *_ = np_moe(p, **kw)
    np.testing.assert_array_equal(ref_ids, np.tile([0, 1, 2], (N, 1)))
    np.testing.assert_allclose(
        np.asarray(moe_reference(**to_jax(p, jnp.float64), **kw)).reshape(N, D), ref_out, **TOL64
    )


def test_equal_rows_pick_lower_index(rng):
    x = np.abs(rng.standard_normal((N, D))) + 0.1
    rw = rng.standard_normal((E, D)) * 0.01
    rw[5] = rw[2] = 1.0  # experts 2 and 5 tie and beat the rest
    for score_func in ("softmax", "sigmoid"):
        ids = route_reference(
            jnp.asarray(x, jnp.float32), jnp.asarray(rw, jnp.float32), 2, score_func=score_func
        ).topk_ids
        np.testing.assert_array_equal(np.asarray(ids), np.tile([2, 5], (N, 1)))
    # Identical tokens give identical weights: capacity keeps the earliest tokens.
    xs = np.tile(x[:1], (N, 1))
    routing = route_reference(
        jnp.asarray(xs, jnp.float32), jnp.asarray(rw, jnp.float32), 1, capacity_factor=2.0
    )
    cap = math.ceil(2.0 * N / E)
    np.testing.assert_array_equal(np.asarray(routing.kept)[:, 0], np.arange(N) < cap)


# ---- (c) ragged_dot baseline ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation,top_k,skewed", [("swiglu", 2, False), ("geglu", 3, True), ("relu2", 1, False)]
)
def test_ragged_dot_matches_reference(rng, activation, top_k, skewed):
    p = make_inputs(rng)
    if skewed:  # every token picks expert 3 first: most groups are empty
        p["x"] = np.abs(p["x"])
        p["router_weight"][3] = 2.0
    j = to_jax(p, jnp.float32)
    args = (j["x"], j["router_weight"], j["w_up"], j["w_down"])

    ct = jnp.asarray(rng.standard_normal((*N_SHAPE, D)), jnp.float32)

    def out_and_grads(fn):
        def f(*a):
            out, vjp = jax.vjp(lambda *a: fn(*a, top_k, activation=activation), *a)
            return out, vjp(ct)

        return jax.jit(f)(*args)

    out, g = out_and_grads(ragged_dot_moe)
    ref, g_ref = out_and_grads(moe_reference)
    assert out.dtype == jnp.float32 and out.shape == (*N_SHAPE, D)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL32)
    grads = dict(zip(("x", "router_weight", "w_up", "w_down"), zip(g, g_ref, strict=True), strict=True))
    if top_k == 1:
        # ragged_dot_moe normalises the top-k weights, so a lone weight is exactly 1 and the router
        # gradient is zero in exact arithmetic: both sides hold fp32 round-off only (measured
        # <= 1e-7 of the largest other gradient).
        router = grads.pop("router_weight")
        scale = max(float(jnp.abs(t).max()) for pair in grads.values() for t in pair)
        for fn, t in zip(("ragged_dot_moe", "moe_reference"), router, strict=True):
            assert float(jnp.abs(t).max()) <= 1e-5 * scale, fn
    for name, (a, b) in grads.items():
        assert float(jnp.abs(b).max()) > 0, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL32, err_msg=name)


def test_ragged_dot_bf16(rng):
    p = to_jax(make_inputs(rng), jnp.bfloat16)
    args = (p["x"], p["router_weight"], p["w_up"], p["w_down"])
    out = jax.jit(lambda *a: ragged_dot_moe(*a, 2))(*args)
    ref = moe_reference(*args, 2)  # fp32 math on the same bf16 values
    assert out.dtype == jnp.bfloat16
    # The baseline rounds the activation and the output to bf16 (2^-9 relative each):
    # errors stay near 1e-2 for unit-scale outputs.
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


# ---- (d) aux losses and their gradients ------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_loss_gradients(rng, x64, score_func):
    p = make_inputs(rng, bias=True)
    j = to_jax(p, jnp.float64)

    def aux_of(x, rw):
        return moe_reference(
            x,
            rw,
            j["w_up"],
            j["w_down"],
            2,
            score_func=score_func,
            expert_bias=j["expert_bias"],
            capacity_factor=0.5,
            return_aux=True,
        )[1]

    losses = lambda x, rw: jnp.stack([aux_of(x, rw)["load_balance_loss"], aux_of(x, rw)["z_loss"]])
    jx, jrw = jax.jit(jax.jacrev(losses, argnums=(0, 1)))(j["x"], j["router_weight"])
    g_lbl, g_z = (jx[0], jrw[0]), (jx[1], jrw[1])

    x, rw = p["x"].reshape(N, D), p["router_weight"]
    *_, ref_aux = np_moe(p, 2, score_func=score_func, capacity_factor=0.5)
    t = ref_aux["tokens_per_expert"].astype(np.float64)
    logits = x @ rw.T
    sm = np.exp(logits - logits.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    # d/dlogits of E * sum_e (t_e / N) * mean_n q[n, e], counts held constant.
    if score_func == "softmax":
        q = sm
        dlogits = E / N**2 * q * (t - (q * t).sum(-1, keepdims=True))
    else:
        s = 1.0 / (1.0 + np.exp(-logits))
        q = s / s.sum(-1, keepdims=True)
        dlogits = E / N**2 * s * (1 - s) / s.sum(-1, keepdims=True) * (t - (q * t).sum(-1, keepdims=True))
    lse = np.log(np.exp(logits).sum(-1))
    dz = 2.0 / N * lse[:, None] * sm
    for (gx, grw), dl in ((g_lbl, dlogits), (g_z, dz)):
        np.testing.assert_allclose(np.asarray(grw), dl.T @ x, **TOL64)
        np.testing.assert_allclose(np.asarray(gx).reshape(N, D), dl @ rw, **TOL64)


@pytest.mark.parametrize("skewed", [False, True])
def test_ragged_dot_aux_matches_reference(rng, x64, skewed):
    p = make_inputs(rng)
    if skewed:  # every token picks expert 3 first: most experts get no token
        p["x"] = np.abs(p["x"])
        p["router_weight"][3] = 2.0
    j = to_jax(p, jnp.float64)
    w = (j["w_up"], j["w_down"])

    def losses(fn, x, rw):
        aux = fn(x, rw, *w, 2, return_aux=True)[1]
        return jnp.stack([aux["load_balance_loss"], aux["z_loss"]]), aux

    args = (j["x"], j["router_weight"])
    (val, aux), (val_ref, aux_ref) = (losses(fn, *args) for fn in (ragged_dot_moe, moe_reference))
    np.testing.assert_array_equal(aux["tokens_per_expert"], aux_ref["tokens_per_expert"])
    assert aux["tokens_per_expert"].dtype == jnp.int32 and int(aux["dropped_tokens"]) == 0
    if skewed:  # (random routing may or may not leave an expert empty: only the skewed case is sure to)
        assert (np.asarray(aux["tokens_per_expert"]) == 0).any()
    np.testing.assert_allclose(np.asarray(val), np.asarray(val_ref), **TOL64)
    jac = lambda fn: jax.jacrev(lambda x, rw: losses(fn, x, rw)[0], argnums=(0, 1))(*args)
    for g, g_ref in zip(jac(ragged_dot_moe), jac(moe_reference), strict=True):
        assert float(jnp.abs(g_ref).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), **TOL64)


def test_ragged_dot_aux_no_tokens():
    x, w = jnp.zeros((0, D), jnp.float32), (jnp.ones((E, D)), jnp.ones((E, 2 * F, D)), jnp.ones((E, D, F)))
    out, aux = ragged_dot_moe(x, *w, 2, return_aux=True)
    assert out.shape == (0, D)
    assert float(aux["load_balance_loss"]) == 0.0 and float(aux["z_loss"]) == 0.0
    assert aux["tokens_per_expert"].tolist() == [0] * E
    with pytest.raises(TypeError, match="return_aux"):
        ragged_dot_moe(x, *w, 2, return_aux=1)


# ---- (e) cross-check with the torch reference ------------------------------------------------------

TORCH_CONFIGS = {
    "plain": dict(top_k=2),
    "sigmoid-groups-capacity": dict(
        top_k=3,
        score_func="sigmoid",
        bias=True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        capacity_factor=0.75,
        activation="geglu",
    ),
    "nonorm-shared-gated": dict(top_k=2, activation="relu2", norm_topk_prob=False, shared=True, gate=True),
}


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("plain", "float64"),
        ("plain", "float32"),
        ("sigmoid-groups-capacity", "float64"),
        ("nonorm-shared-gated", "float32"),
    ],
)
def test_matches_torch_reference(rng, x64, name, dtype):
    from flashfusemoe import reference as torch_ref
    kw, flags = split_cfg(TORCH_CONFIGS[name])
    p = make_inputs(rng, **flags)
    ct = rng.standard_normal((*N_SHAPE, D))
    tol = TOL64 if dtype == "float64" else TOL32
    jdt, tdt = getattr(jnp, dtype), getattr(torch, dtype)

    j = to_jax(p, jdt)
    bias = j.pop("expert_bias", None)
    ct_j = jnp.asarray(ct, jdt)

    def f(q):
        fn = lambda q: moe_reference(**q, **kw, expert_bias=bias, return_aux=True)
        out, vjp, aux = jax.vjp(fn, q, has_aux=True)
        return out, aux, vjp(ct_j)[0]

    out, aux, grads = jax.jit(f)(j)

    t = {
        k: torch.tensor(
            v,
            dtype=torch.float32 if k == "expert_bias" and dtype != "float64" else tdt,
            requires_grad=k != "expert_bias",
        )
        for k, v in p.items()
    }
    t_out, t_aux = torch_ref.moe_reference(**t, **kw, return_aux=True)
    (t_out * torch.tensor(ct, dtype=tdt)).sum().backward()

    np.testing.assert_allclose(np.asarray(out), t_out.detach().numpy(), **tol)
    for k in grads:
        np.testing.assert_allclose(np.asarray(grads[k]), t[k].grad.numpy(), **tol, err_msg=k)
    for k in ("load_balance_loss", "z_loss"):
        np.testing.assert_allclose(float(aux[k]), float(t_aux[k].detach()), **tol, err_msg=k)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), t_aux["tokens_per_expert"].numpy())
    assert int(aux["dropped_tokens"]) == int(t_aux["dropped_tokens"])


# ---- argument checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,err",
    [
        (dict(top_k=0), ValueError),
        (dict(top_k=2.0), TypeError),
        (dict(activation="gelu"), ValueError),
        (dict(score_func="tanh"), ValueError),
        (dict(n_group=4), ValueError),
        (dict(n_group=3, topk_group=1), ValueError),
        (dict(n_group=4, topk_group=1, top_k=3), ValueError),
        (dict(capacity_factor=0.0), ValueError),
        (dict(expert_bias=np.zeros(E + 1, np.float32)), ValueError),
        (dict(w_down=np.zeros((E, D, F + 1), np.float32)), ValueError),
        (dict(router_weight=np.zeros((E, D + 1), np.float32)), ValueError),
        (dict(x=np.zeros((N, D), np.int32)), TypeError),
        (dict(shared_w_up=np.zeros((8, D), np.float32)), ValueError),
        (dict(shared_gate_weight=np.zeros((1, D), np.float32)), ValueError),
    ],
)
def test_rejects_bad_arguments(rng, change, err):
    p = {k: v.astype(np.float32) for k, v in make_inputs(rng).items()}
    args = {"top_k": 2, **p, **change}
    with pytest.raises(err):
        moe_reference(**args)
