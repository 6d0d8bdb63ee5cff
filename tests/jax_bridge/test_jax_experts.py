"""jax_bridge.moe_experts: bit-identical to torch's flashfusemoe.moe_experts, values and gradients."""

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from moe_cases import case_rng, draw_experts_config  # noqa: E402

import flashfusemoe  # noqa: E402
import jax_bridge  # noqa: E402
from flashfusemoe.experts import make_experts_plan  # noqa: E402

TORCH_DEVICE = "cuda" if jax.default_backend() == "gpu" else "cpu"
JAX_DTYPES = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}


def to_jax(t):
    if not t.is_floating_point():
        return jnp.asarray(t.cpu().numpy())
    return jnp.asarray(t.detach().cpu().float().numpy()).astype(JAX_DTYPES[t.dtype])


def to_torch(a, dtype):
    return torch.from_numpy(np.array(jnp.asarray(a).astype(jnp.float32))).to(TORCH_DEVICE, dtype)


def problem(N, D, F, E, K, dtype, weights_dtype=None, ids=None):
    kw = {"device": TORCH_DEVICE}
    x = torch.randn(N, D, dtype=dtype, **kw)
    w_up = (torch.randn(E, 2 * F, D, **kw) / D**0.5).to(dtype)
    w_down = (torch.randn(E, D, F, **kw) / F**0.5).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(N)]).to(TORCH_DEVICE, torch.int32)
    weights = torch.rand(N, K, dtype=weights_dtype or dtype, **kw)
    return x, ids, weights, w_up, w_down


def run_both(x, ids, weights, w_up, w_down, **kw):
    grad_out = torch.randn_like(x)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weights, w_up, w_down)]
    out = flashfusemoe.moe_experts(leaves[0], ids, *leaves[1:], **kw)
    grads = torch.autograd.grad(out, leaves, grad_out)

    @jax.jit
    def run(x, ids, weights, w_up, w_down, g):
        fn = lambda x_, w, u, d: jax_bridge.moe_experts(x_, ids, w, u, d, **kw)  # noqa: E731
        out, vjp = jax.vjp(fn, x, weights, w_up, w_down)
        return out, vjp(g)

    j_out, j_grads = run(*(to_jax(t) for t in (x, ids, weights, w_up, w_down, grad_out)))
    return (out, grads), (j_out, j_grads)


def assert_bit_identical(torch_results, jax_results):
    (out, grads), (j_out, j_grads) = torch_results, jax_results
    names = ("out", "x", "topk_weights", "w_up", "w_down")
    for name, t, a in zip(names, (out, *grads), (j_out, *j_grads)):
        t, got = t.detach(), to_torch(a, t.dtype)
        diff = float((got.double() - t.double()).abs().max()) if t.numel() else 0.0
        assert torch.equal(got, t), f"{name}: max diff {diff}"


@pytest.mark.parametrize("case", range(4))
def test_bit_identical_random_config(case):
    """A random draw (``moe_cases.draw_experts_config``: ids with repeats, K up to 2E), float32."""
    (N, D, F, E, K), ids, options = draw_experts_config(case_rng(case))
    tensors = problem(N, D, F, E, K, torch.float32, ids=ids.to(TORCH_DEVICE, torch.int32))
    most = int(torch.bincount(ids.flatten().long(), minlength=E).max())
    if options["gemm"] == "bmm" and most > make_experts_plan("bmm", N, K, E).rows_per_expert:
        # An expert overflows the padded layout: torch grows it (one host sync); the bridge, inside
        # jax.jit, cannot, and raises rather than dropping rows.
        with pytest.raises(jax.errors.JaxRuntimeError, match="CapacityOverflowError: gemm='bmm'"):
            run_both(*tensors, **options)
        return
    assert_bit_identical(*run_both(*tensors, **options))


def test_bmm_overflow_raises_from_the_callback():
    """Expert 2 gets 3 assignments where the padded layout holds 2 (twice the mean load): torch
    grows the layout, the bridge inside jax.jit raises ``CapacityOverflowError``, dropping nothing."""
    ids = torch.tensor([[6, 2, 6, 7], [1, 2, 1, 2]], dtype=torch.int32, device=TORCH_DEVICE)
    tensors = problem(2, 8, 4, 8, 4, torch.float32, ids=ids)
    assert make_experts_plan("bmm", 2, 4, 8).rows_per_expert == 2
    with pytest.raises(jax.errors.JaxRuntimeError, match="CapacityOverflowError: gemm='bmm'"):
        run_both(*tensors, gemm="bmm")
    # Sized for it, the bridge runs, bit-identical to torch.
    assert_bit_identical(*run_both(*tensors, gemm="bmm", max_tokens_per_expert=3))


def test_bad_max_tokens_per_expert_names_the_argument():
    x, ids, weights, w_up, w_down = (to_jax(t) for t in problem(4, 8, 4, 6, 2, torch.float32))
    with pytest.raises(ValueError, match="max_tokens_per_expert=0 must be >= 1"):
        jax_bridge.moe_experts(x, ids, weights, w_up, w_down, gemm="bmm", max_tokens_per_expert=0)
    with pytest.raises(ValueError, match="max_tokens_per_expert=4 sizes the padded layout of gemm='bmm'"):
        jax_bridge.moe_experts(x, ids, weights, w_up, w_down, gemm="grouped", max_tokens_per_expert=4)


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
@pytest.mark.parametrize("dtype, weights_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_bit_identical_to_torch(dtype, weights_dtype, gemm):
    x, ids, weights, w_up, w_down = problem(12, 16, 8, 4, 2, dtype, weights_dtype)
    ids[0] = torch.tensor([3, 3])  # a repeated id
    assert_bit_identical(*run_both(x, ids, weights, w_up, w_down, gemm=gemm))


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_distinct_ids_bit_identical_to_torch(gemm):
    x, ids, weights, w_up, w_down = problem(12, 16, 8, 4, 2, torch.float32)
    assert_bit_identical(*run_both(x, ids, weights, w_up, w_down, gemm=gemm, distinct_ids=True))


def test_adversarial_routing_and_recompute():
    x, ids, weights, w_up, w_down = problem(9, 16, 8, 6, 3, torch.float32)
    ids[:] = torch.tensor([5, 5, 0], dtype=torch.int32)  # two experts take everything, four are empty
    assert_bit_identical(*run_both(x, ids, weights, w_up, w_down, recompute=True))


def test_no_tokens():
    no_ids = torch.zeros(0, 2, dtype=torch.int32, device=TORCH_DEVICE)
    x, ids, weights, w_up, w_down = problem(0, 16, 8, 4, 2, torch.float32, ids=no_ids)
    assert_bit_identical(*run_both(x, ids, weights, w_up, w_down))


def test_bad_ids_raise():
    x, ids, weights, w_up, w_down = problem(4, 16, 8, 4, 2, torch.float32)
    ids[1, 0] = 4
    args = [to_jax(t) for t in (x, ids, weights, w_up, w_down)]
    message = r"topk_ids must hold expert ids in \[0, num_experts=4\), got 4 at \[1, 0\]"
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(jax_bridge.moe_experts(*args))
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64, got float32"):
        jax_bridge.moe_experts(args[0], args[2], args[2], *args[3:])
    with pytest.raises(ValueError, match=r"topk_weights must be \[N=4, K=2\]"):
        jax_bridge.moe_experts(args[0], args[1], args[2][:, :1], *args[3:])
    with pytest.raises(TypeError, match="topk_ids must be a jax.Array"):
        jax_bridge.moe_experts(args[0], [[0, 1]] * 4, *args[2:])


def test_vmap_runs_per_batch_element():
    x, ids, weights, w_up, w_down = problem(6, 16, 8, 4, 2, torch.float32)
    xs = jnp.stack([to_jax(x), to_jax(x) * 2])
    outs = jax.vmap(lambda x_: jax_bridge.moe_experts(x_, to_jax(ids), to_jax(weights), to_jax(w_up),
                                                      to_jax(w_down)))(xs)
    expected = flashfusemoe.moe_experts(x * 2, ids, weights, w_up, w_down)
    assert torch.equal(to_torch(outs[1], torch.float32), expected)
