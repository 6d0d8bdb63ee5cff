"""jax_bridge.ffi: a Python function as an XLA FFI custom call (the bridge's callback mechanism)."""

import functools

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jax_bridge import ffi  # noqa: E402


def _affine(scale, ctx, outs, x, extra):
    """outs = (x * scale + extra["b"], per-column sums of x, x's row count as int32)."""
    assert ctx.stream is None or isinstance(ctx.stream, int)
    tx, tb = x.to_torch(), extra["b"].to_torch()
    out, sums, rows = (o.to_torch() for o in outs)
    out.copy_(tx * scale + tb)
    sums.copy_(tx.float().sum(0))
    rows.fill_(tx.shape[0])


def _specs(x):
    return (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape[1:], jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_results_match_torch_under_jit(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 3)), dtype)
    b = jnp.asarray(rng.standard_normal((5, 3)), dtype)
    call = ffi.python_call(functools.partial(_affine, 2.0), _specs(x))
    out, sums, rows = jax.jit(lambda x, b: call(x, {"b": b}))(x, b)
    tx = torch.from_numpy(np.array(x.astype(jnp.float32))).to(getattr(torch, jnp.dtype(dtype).name))
    tb = torch.from_numpy(np.array(b.astype(jnp.float32))).to(tx.dtype)
    want = (tx * 2.0 + tb).float().numpy()
    assert np.array_equal(np.asarray(out.astype(jnp.float32)), want)
    assert np.allclose(np.asarray(sums), tx.float().sum(0).numpy(), rtol=1e-6)
    assert int(rows) == 5 and rows.dtype == jnp.int32


def test_none_arguments_empty_buffers_and_vmap():
    def fn(ctx, out, x, nothing, empty):
        assert nothing is None and empty.shape == (0, 4) and empty.to_torch().numel() == 0
        out.to_torch().copy_(x.to_torch() + 1)

    call = ffi.python_call(fn, jax.ShapeDtypeStruct((3,), jnp.float32), vmap_method="sequential")
    x = jnp.arange(6.0).reshape(2, 3)
    got = jax.jit(jax.vmap(lambda r: call(r, None, jnp.zeros((0, 4)))))(x)
    assert np.array_equal(np.asarray(got), np.asarray(x) + 1)


def test_an_exception_fails_the_call_with_its_message():
    def fn(ctx, out, x):
        raise ValueError("topk_ids out of range in the callback")

    call = ffi.python_call(fn, jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match="ValueError: topk_ids out of range in the callback"):
        jax.block_until_ready(jax.jit(call)(jnp.zeros(2)))


def test_retracing_reuses_one_registry_entry():
    """The bridge builds its call at every trace: the same partial must not add entries."""
    before = len(ffi._registry)
    for _ in range(3):
        call = ffi.python_call(functools.partial(_affine, 3.0), _specs(jnp.zeros((2, 2))))
        call(jnp.ones((2, 2)), {"b": jnp.zeros((2, 2))})  # eager: traced each time
    assert len(ffi._registry) - before <= 1


def test_the_program_has_no_host_callbacks():
    """What the module is for: JAX keeps its C++ dispatch only for programs without host
    callbacks, which buffer_callback would add."""
    call = ffi.python_call(functools.partial(_affine, 1.0), _specs(jnp.zeros((2, 2))))
    lowered = jax.jit(lambda x: call(x, {"b": x})).lower(jnp.ones((2, 2)))
    text = lowered.as_text()
    assert ffi._TARGET in text and "xla_buffer_python" not in text
    assert not lowered._lowering.compile_args.get("host_callbacks")


@pytest.mark.parametrize("jit", [False, True])
def test_bridge_on_the_ffi_call_is_bit_identical_to_buffer_callback(monkeypatch, jit):
    """jax_bridge.fused_moe, output and every gradient, through both custom-call mechanisms."""
    import jax_bridge
    from jax_bridge import callback

    N, D, F, E, K = 24, 16, 12, 4, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    args = [jax.random.normal(keys[0], (N, D)), jax.random.normal(keys[1], (E, D)) * 0.3,
            jax.random.normal(keys[2], (E, 2 * F, D)) * 0.2, jax.random.normal(keys[3], (E, D, F)) * 0.2]
    cot = jax.random.normal(keys[4], (N, D))

    def fwd_bwd(*a):
        out, vjp = jax.vjp(lambda *p: jax_bridge.fused_moe(*p, K), *a)
        return out, vjp(cot)

    results = {}
    for use_ffi in (False, True):
        monkeypatch.setattr(callback, "USE_FFI", use_ffi)
        jaxpr = str(jax.make_jaxpr(fwd_bwd)(*args))
        assert ("ffi_call" in jaxpr) == use_ffi and ("buffer_callback" in jaxpr) != use_ffi
        fn = jax.jit(fwd_bwd) if jit else fwd_bwd
        results[use_ffi] = jax.tree.leaves(fn(*args))
        jax.clear_caches()
    for a, b in zip(results[False], results[True], strict=True):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))


def test_experts_on_the_ffi_call_are_bit_identical_to_buffer_callback(monkeypatch):
    """jax_bridge.moe_experts (the experts-only twin), output and its four gradients, under jit."""
    import jax_bridge
    from jax_bridge import callback

    N, D, F, E, K = 20, 16, 12, 4, 2
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    x = jax.random.normal(keys[0], (N, D))
    ids = jnp.argsort(jax.random.uniform(keys[1], (N, E)), axis=1)[:, :K].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (N, K)), axis=1)
    w_up = jax.random.normal(keys[3], (E, 2 * F, D)) * 0.2
    w_down = jax.random.normal(keys[4], (E, D, F)) * 0.2
    cot = jax.random.normal(keys[5], (N, D))

    def fwd_bwd(x, w, u, d):
        out, vjp = jax.vjp(lambda x, w, u, d: jax_bridge.moe_experts(x, ids, w, u, d), x, w, u, d)
        return out, vjp(cot)

    results = {}
    for use_ffi in (False, True):
        monkeypatch.setattr(callback, "USE_FFI", use_ffi)
        assert ("ffi_call" in str(jax.make_jaxpr(fwd_bwd)(x, weights, w_up, w_down))) == use_ffi
        results[use_ffi] = jax.tree.leaves(jax.jit(fwd_bwd)(x, weights, w_up, w_down))
        jax.clear_caches()
    for a, b in zip(results[False], results[True], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
