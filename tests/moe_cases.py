"""Shared helpers: random MoE problems, fused-vs-reference runs, error measures."""

import math
import random

import torch
import torch.nn.functional as F

import flashfusemoe
from flashfusemoe.config import ACTIVATIONS, GEMMS, SCORE_FUNCS
from flashfusemoe.kernels import permute, routing
from flashfusemoe.reference import moe_reference

REFERENCE_OPTIONS = ("activation", "score_func", "norm_topk_prob", "expert_bias", "n_group", "topk_group",
                     "routed_scaling_factor", "capacity_factor")


def random_moe(N, D, F, E, dtype=torch.float64, device="cpu", lead_shape=None):
    """Fresh random x [N, D] (or lead_shape + [D]) and weights at a unit-variance scale."""
    shape = (*lead_shape, D) if lead_shape else (N, D)
    x = torch.randn(shape, dtype=dtype, device=device)
    router_weight = torch.randn(E, D, dtype=dtype, device=device) / math.sqrt(D)
    w_up = torch.randn(E, 2 * F, D, dtype=dtype, device=device) / math.sqrt(D)
    w_down = torch.randn(E, D, F, dtype=dtype, device=device) / math.sqrt(F)
    return x, router_weight, w_up, w_down


def routing_decisions(x, r, top_k, options):
    """The discrete routing outcome of ``fused_moe(x, r, ..., top_k, **options)``: which (token,
    expert) pairs are selected, and with ``capacity_factor`` which of them are kept. [N, E] or [N, 2E]."""
    E = r.shape[0]
    _, ids, weights = routing.route_forward(x, r, options.get("expert_bias"), top_k,
                                            options.get("score_func", "softmax"),
                                            options.get("norm_topk_prob", True), options.get("n_group"),
                                            options.get("topk_group"),
                                            options.get("routed_scaling_factor", 1.0))
    selected = torch.zeros(x.shape[0], E, dtype=torch.bool).scatter_(1, ids.long(), True)
    if options.get("capacity_factor") is None:
        return selected
    capacity = math.ceil(options["capacity_factor"] * x.shape[0] * top_k / E)
    keep = permute.capacity_keep(ids, weights, E, capacity).view(ids.shape)
    kept = torch.zeros_like(selected).scatter_(1, ids.long(), keep)
    return torch.cat([selected, kept], dim=1)


def far_from_ties(N, D, F, E, top_k, options=None, tries=50):
    """A ``random_moe`` draw whose routing decisions survive perturbations of x and the router 100x
    a finite-difference step of 1e-6 (gradcheck differentiates a piecewise-smooth function)."""
    options = options or {}
    for _ in range(tries):
        x, r, u, d = random_moe(N=N, D=D, F=F, E=E)
        base = routing_decisions(x, r, top_k, options)
        nudged = lambda t: t + 1e-4 * torch.randn_like(t)  # noqa: E731
        if all(torch.equal(base, routing_decisions(nudged(x), nudged(r), top_k, options)) for _ in range(8)):
            return x, r, u, d
    raise RuntimeError(f"far_from_ties: no draw of {tries} kept its routing under 1e-4 perturbations")


def run_with_grads(fn, tensors, grad_out, aux_key=None):
    """Runs fn on leaf copies of tensors; returns (out, aux, grads) for loss <out, grad_out> (+ aux)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    result = fn(*leaves)
    out, aux = result if isinstance(result, tuple) else (result, None)
    loss = (out.float() * grad_out.float()).sum() if out.dtype != torch.float64 else (out * grad_out).sum()
    if aux_key is not None:
        loss = out.sum() * 0 + aux[aux_key]
    # A loss that does not depend on the inputs (the reference with no tokens) has zero gradients.
    grads = [None] * len(leaves)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out.detach(), aux, grads


def fused_and_reference(tensors, top_k, grad_out=None, aux_key=None, ref_dtype=None, **options):
    """(out, aux, grads) of flashfusemoe.fused_moe and of moe_reference on the same inputs.

    ref_dtype upcasts the reference's inputs (e.g. float64 reference for a float32 GPU run).
    """
    return_aux = aux_key is not None or options.pop("return_aux", False)
    if grad_out is None:
        grad_out = torch.randn_like(tensors[0])
    fused = run_with_grads(
        lambda x, r, u, d: flashfusemoe.fused_moe(x, r, u, d, top_k, return_aux=return_aux, **options),
        tensors, grad_out, aux_key)
    ref_opts = {k: v for k, v in options.items() if k in REFERENCE_OPTIONS}
    ref_tensors = [t.to(ref_dtype) for t in tensors] if ref_dtype else tensors
    reference = run_with_grads(
        lambda x, r, u, d: moe_reference(x, r, u, d, top_k, return_aux=return_aux, **ref_opts),
        ref_tensors, grad_out.to(ref_tensors[0].dtype), aux_key)
    return fused, reference


def rel_err(a, b, floor=1e-6):
    """max |a - b| / max(max |b|, floor).

    The floor keeps a mathematically zero gradient (e.g. the router's with top_k=1 and
    norm_topk_prob, where every weight is 1) from turning float64 round-off into a large relative
    error; the tests' real values are O(1e-2..1), so the floor hides no real error.
    """
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not a.numel():
        return 0.0
    return float((a - b).abs().max() / max(float(b.abs().max()), floor))


GRAD_NAMES = ("x", "router_weight", "w_up", "w_down")


def assert_close(fused, reference, tol, what=""):
    """Output and every gradient agree within tol (relative to the reference's max magnitude)."""
    (out_f, _, grads_f), (out_r, _, grads_r) = fused, reference
    assert out_f.shape == out_r.shape
    errors = {"out": rel_err(out_f, out_r)}
    errors.update({f"grad_{n}": rel_err(gf, gr) for n, gf, gr in zip(GRAD_NAMES, grads_f, grads_r)})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad}"
    return errors


# ---- Random configurations --------------------------------------------------------------


def case_rng(case: int) -> random.Random:
    """A generator for one parametrized case, from the test's torch seed (``FFMOE_SEED`` replays
    it) and the case index, so the cases of one run differ."""
    return random.Random(f"{int(torch.randint(2**31, ()))}-{case}")


def _draw_shape(rng: random.Random) -> tuple[int, int, int, int]:
    """(N, D, F, E): down to no tokens, one expert and width-1 experts."""
    return (rng.choice([0, 1, 2, 7, 33]), rng.choice([1, 8, 24]), rng.choice([1, 5, 16]),
            rng.choice([1, 2, 3, 8, 12]))


def _draw_expert_options(rng: random.Random) -> dict:
    return dict(activation=rng.choice(ACTIVATIONS), gemm=rng.choice(GEMMS), recompute=rng.random() < 0.3)


def draw_moe_config(rng: random.Random, bias_dtype=torch.float32) -> tuple[tuple, dict]:
    """``((N, D, F, E, top_k), options)`` for ``fused_moe``: top_k from 1 to E and
    ``draw_options``."""
    N, D, F, E = _draw_shape(rng)
    K = rng.randint(1, E)
    return (N, D, F, E, K), draw_options(rng, E, K, bias_dtype)


def draw_options(rng: random.Random, E: int, K: int, bias_dtype=torch.float32) -> dict:
    """``fused_moe`` options for E experts and top_k=K: every activation, ``gemm`` and routing option
    (scaling, a selection bias ``expert_bias`` [E], expert groups), capacity, recompute."""
    options = _draw_expert_options(rng)
    options.update(score_func=rng.choice(SCORE_FUNCS), norm_topk_prob=rng.random() < 0.5)
    if rng.random() < 0.3:
        options["routed_scaling_factor"] = rng.choice([0.5, 2.5])
    if rng.random() < 0.3:
        options["expert_bias"] = 0.1 * torch.randn(E, dtype=bias_dtype)
    groups = [g for g in range(2, E + 1) if E % g == 0]
    if groups and rng.random() < 0.4:
        n_group = rng.choice(groups)
        topk_group = rng.randint(1, n_group)
        if topk_group * (E // n_group) >= K:
            options.update(n_group=n_group, topk_group=topk_group)
    if rng.random() < 0.3:
        options["capacity_factor"] = rng.choice([0.5, 1.0, 1.5])
    return options


def draw_experts_config(rng: random.Random) -> tuple[tuple, torch.Tensor, dict]:
    """``((N, D, F, E, K), topk_ids, options)`` for ``moe_experts``: ids drawn with repeats (a row
    may name an expert twice; K up to 2E), int32 or int64."""
    N, D, F, E = _draw_shape(rng)
    K = rng.randint(1, 2 * E)
    ids = torch.randint(0, E, (N, K), dtype=rng.choice([torch.int32, torch.int64]))
    return (N, D, F, E, K), ids, _draw_expert_options(rng)


# ---- moe_experts: given routing ------------------------------------------------------------


def experts_reference(x, ids, weights, w_up, w_down, activation="swiglu"):
    """In float64, one expert at a time: out[n] = sum_k w[n, k] * down_e(act(gate_e x[n]) * up_e x[n])."""
    acts = {"swiglu": F.silu, "geglu": F.gelu, "relu2": lambda g: F.relu(g) ** 2}
    f = w_up.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(w_up.shape[0]):
        n, k = (ids == e).nonzero(as_tuple=True)
        h = x[n].double() @ w_up[e].double().T
        y = (acts[activation](h[:, :f]) * h[:, f:]) @ w_down[e].double().T
        out = out.index_add(0, n, weights[n, k].double()[:, None] * y)
    return out


def grads_of(fn, x, ids, weights, w_up, w_down, grad_out):
    """``(out, [grad x, topk_weights, w_up, w_down])`` of ``fn(x, ids, weights, w_up, w_down)`` for
    the output cotangent ``grad_out``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weights, w_up, w_down)]
    out = fn(leaves[0], ids, *leaves[1:])
    grads = [None] * 4
    if out.requires_grad:  # (the reference with no tokens does not depend on its inputs)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.device, out.dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def check_against_reference(x, ids, weights, w_up, w_down, tol, what="", **kw):
    """``moe_experts(..., **kw)`` against ``experts_reference`` in float64: the output and the
    gradients of x, topk_weights, w_up and w_down within ``tol``. Returns the fused gradients."""
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    out, grads = grads_of(lambda *a: flashfusemoe.moe_experts(*a, **kw), x, ids, weights, w_up, w_down,
                          grad_out)
    activation = kw.get("activation", "swiglu")
    inputs64 = (t.cpu().double() if t.is_floating_point() else t.cpu()
                for t in (x, ids, weights, w_up, w_down))
    ref_out, ref_grads = grads_of(lambda x_, i, w, u, d: experts_reference(x_, i, w, u, d, activation),
                                  *inputs64, grad_out)
    assert out.dtype == x.dtype and out.shape == x.shape
    errors = {"out": rel_err(out, ref_out)}
    names = ("x", "topk_weights", "w_up", "w_down")
    for name, g, r, t in zip(names, grads, ref_grads, (x, weights, w_up, w_down)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        errors[f"grad_{name}"] = rel_err(g, r)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad}"
    return grads
