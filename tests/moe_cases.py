"""Shared helpers: random MoE problems, fused-vs-reference runs, error measures."""

import math

import torch

import flashfusemoe
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


def run_with_grads(fn, tensors, grad_out, aux_key=None):
    """Runs fn on leaf copies of tensors; returns (out, aux, grads) for loss <out, grad_out> (+ aux)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    result = fn(*leaves)
    out, aux = result if isinstance(result, tuple) else (result, None)
    loss = (out.float() * grad_out.float()).sum() if out.dtype != torch.float64 else (out * grad_out).sum()
    if aux_key is not None:
        loss = out.sum() * 0 + aux[aux_key]
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
    a, b = a.double(), b.double()
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
