"""Random combinations of shapes and options against the float64 references.

The other tests take each option through chosen cases; these draw a fresh combination per case
from the test's seed (``FFMOE_SEED`` replays one): shapes down to N=0 and E=1, top_k up to E,
every activation, ``gemm`` and routing option, capacity, recompute; for ``moe_experts`` ids with
repeats; for ``MoELayer`` shared experts, their gate and the aux losses. float64 on both sides, so
the kernels (the interpreter on CPU) must match the reference in the output, the routing counts and
every gradient to 1e-9 relative. (``tests/jax_bridge`` runs the same draws through the bridge.)
"""

import pytest
import torch
from moe_cases import (
    REFERENCE_OPTIONS,
    assert_close,
    case_rng,
    check_against_reference,
    draw_experts_config,
    draw_moe_config,
    fused_and_reference,
    random_moe,
    rel_err,
)

import flashfusemoe
from flashfusemoe.reference import moe_reference

TOL64 = 1e-9


@pytest.mark.parametrize("case", range(24))
def test_fused_moe_random_config(case):
    (N, D, F, E, K), options = draw_moe_config(case_rng(case), torch.float64)
    what = f"N={N} D={D} F={F} E={E} K={K} {options}"
    fused, ref = fused_and_reference(random_moe(N, D, F, E), K, return_aux=True, **options)
    if K == 1 and options["norm_topk_prob"]:
        # Every routing weight is exactly 1 (times the scaling): the router's gradient is zero, and
        # both sides return float64 residue of cancelling terms. Check it is residue, then set it aside.
        scale = max(float(g.abs().max()) for g in ref[2][:1] + ref[2][2:]) if N else 1.0
        for result in (fused, ref):
            assert float(result[2][1].abs().max()) <= 1e-12 * scale, what
            result[2][1] = torch.zeros_like(result[2][1])
    assert_close(fused, ref, TOL64, what)
    assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long()), what
    assert int(fused[1]["dropped_tokens"]) == int(ref[1]["dropped_tokens"]), what


@pytest.mark.parametrize("case", range(8))
def test_moe_experts_random_config(case):
    (N, D, F, E, K), ids, options = draw_experts_config(case_rng(case))
    x, _, w_up, w_down = random_moe(N, D, F, E)
    weights = torch.rand(N, K, dtype=torch.float64)
    check_against_reference(x, ids, weights, w_up, w_down, TOL64, f"N={N} D={D} F={F} E={E} K={K} {options}",
                            **options)


@pytest.mark.parametrize("case", range(8))
def test_layer_random_config(case):
    """``MoELayer`` with a random draw, a shared expert (none, one or two, gated or not), a selection
    bias buffer and a leading batch dim, against ``moe_reference`` on the same parameters: the
    output and the gradient of every parameter for a loss with both aux losses in it."""
    rng = case_rng(case)
    (N, D, F, E, K), options = draw_moe_config(rng, torch.float64)
    bias = options.pop("expert_bias", None)
    shared = rng.choice([0, 1, 2])
    gate = shared > 0 and rng.random() < 0.5
    layer = flashfusemoe.MoELayer(D, F, E, K, use_expert_bias=bias is not None, num_shared_experts=shared,
                                  shared_expert_gate=gate, dtype=torch.float64, **options)
    if bias is not None:
        layer.expert_bias.copy_(bias)
    x = torch.randn(*rng.choice([(N,), (2, N)]), D, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    what = f"N={N} D={D} F={F} E={E} K={K} {options} shared={shared} gate={gate} bias={bias is not None}"
    params = dict(layer.named_parameters())

    def grads(out, aux):
        """(out, aux, {parameter name: gradient}), a zero gradient where the loss does not reach it."""
        loss = (out * grad_out).sum()
        if N:  # (no tokens: the losses are 0 here, and the reference's means over nothing are NaN)
            loss = loss + 0.3 * aux["load_balance_loss"] + 0.7 * aux["z_loss"]
        found = [None] * len(params)
        if loss.requires_grad:  # (not for the reference with no tokens and no shared expert)
            found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return out.detach(), aux, {name: torch.zeros_like(p) if g is None else g
                                   for (name, p), g in zip(params.items(), found)}

    fused = grads(*layer(x, return_aux=True))
    ref_options = {k: v for k, v in options.items() if k in REFERENCE_OPTIONS}
    shared_weights = {n: p for n, p in params.items() if n.startswith("shared_")}
    ref_bias = layer.expert_bias if bias is not None else None
    ref = grads(*moe_reference(x, layer.router_weight, layer.w_up, layer.w_down, K, expert_bias=ref_bias,
                               return_aux=True, **ref_options, **shared_weights))
    errors = {"out": rel_err(fused[0], ref[0])}
    errors.update({f"grad_{name}": rel_err(g, ref[2][name]) for name, g in fused[2].items()})
    for key in ("load_balance_loss", "z_loss"):
        value = fused[1][key].detach()
        errors[key] = rel_err(value, ref[1][key].detach()) if N else abs(float(value))  # (0 with no tokens)
    assert all(e <= TOL64 for e in errors.values()), f"{what}: {errors}"
    assert torch.equal(fused[1]["tokens_per_expert"].long(), ref[1]["tokens_per_expert"].long()), what
