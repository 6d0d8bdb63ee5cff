"""Flax modules (NNX, Linen), torch <-> JAX converters and ``python -m jax_bridge.compare``.

The torch ``MoELayer`` and the JAX modules share the functional core, so on the same weights
the routed part must be bit-identical; the shared expert is computed by each framework's own
matmuls and is checked against a float64 torch reference instead.
"""

import math

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import flashfusemoe  # noqa: E402
from flashfusemoe.reference import moe_reference as torch_reference  # noqa: E402
from jax_bridge import compare, convert, fused_moe  # noqa: E402
from jax_bridge import linen as jlinen  # noqa: E402
from jax_bridge import nnx as jnnx  # noqa: E402

D, F, E, K = 16, 8, 4, 2
LEAD = (2, 5)  # 10 tokens
# f32 against a float64 reference: the chains are three contractions of length <= 16 plus
# softmax/sigmoid; a few roundings of eps32 = 1.2e-7 at O(1) values stay far below 1e-5.
TOL32 = 1e-5
TORCH_DTYPE = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}
# The bridge runs torch on the device of XLA's buffers: torch-native must run there too.
DEVICE = "cuda" if jax.default_backend() == "gpu" else "cpu"


def _key():
    """A JAX key from the torch seed that conftest sets (and reports) for each test."""
    return jax.random.key(int(torch.randint(0, 2**31 - 1, ())))


def _to_jax(t):
    return jnp.asarray(convert.torch_to_numpy(t))


def _np64(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, np.float64)


def _rel(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = _np64(a), _np64(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _torch_layer(dtype=torch.float32, device=DEVICE, **kwargs):
    """A torch MoELayer with a random (non-zero) expert bias when it has one."""
    layer = flashfusemoe.MoELayer(D, F, E, K, dtype=dtype, device=device, **kwargs)
    if layer.expert_bias is not None:
        layer.expert_bias.copy_(torch.randn(E) * 0.1)
    return layer


def _nnx_from_torch(layer, **kwargs):
    module = jnnx.FusedMoE(**convert.layer_kwargs_from_torch(layer), **kwargs, rngs=nnx.Rngs(_key()))
    return convert.load_torch_state_dict_into_nnx(module, layer.state_dict())


def _torch_fwd_bwd(layer, x, grad_out):
    """(out, {name: grad}) of <layer(x), grad_out> for x and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x, *layer.parameters()], grad_out)
    return out.detach(), dict(zip(["x", *names], grads))


def _nnx_fwd_bwd(module, x, grad_out):
    """Same as _torch_fwd_bwd for an NNX module, under jit."""

    @nnx.jit
    def run(module, x, grad_out):
        def loss(params, x):
            out = convert.apply_layer(params, x, module.config, dtype=module.dtype)
            return jnp.sum(out.astype(jnp.float32) * grad_out.astype(jnp.float32)), out

        params = module.params_dict()
        (_, out), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return out, g_params, g_x

    out, g_params, g_x = run(module, x, grad_out)
    g_params.pop("expert_bias", None)
    return out, {"x": g_x, **g_params}


# gemm is explicit, so each set runs the layout it names.
OPTION_SETS = {
    "default": dict(gemm="grouped"),
    "sigmoid-bias": dict(
        activation="geglu",
        score_func="sigmoid",
        use_expert_bias=True,
        routed_scaling_factor=2.0,
        gemm="grouped",
    ),
    "groups-capacity-bmm": dict(
        activation="relu2", n_group=2, topk_group=1, capacity_factor=0.75, gemm="bmm"
    ),
}


@pytest.mark.parametrize(
    "options, dtype",
    [
        pytest.param(OPTION_SETS["default"], jnp.float32, id="default-f32"),
        pytest.param(OPTION_SETS["default"], jnp.bfloat16, id="default-bf16"),
        pytest.param(OPTION_SETS["sigmoid-bias"], jnp.bfloat16, id="sigmoid-bias-bf16"),
        pytest.param(OPTION_SETS["groups-capacity-bmm"], jnp.float32, id="groups-capacity-bmm-f32"),
    ],
)
def test_nnx_module_bit_identical_to_torch_layer(dtype, options):
    layer = _torch_layer(TORCH_DTYPE[dtype], **options)
    module = jnnx.FusedMoE.from_torch(layer)
    assert module.param_dtype == dtype
    x = torch.randn(*LEAD, D).to(DEVICE, TORCH_DTYPE[dtype])
    grad_out = torch.randn(*LEAD, D).to(DEVICE, TORCH_DTYPE[dtype])
    out_t, grads_t = _torch_fwd_bwd(layer, x, grad_out)
    # The bridge's <out, grad_out> cotangent is grad_out itself: same backward inputs as torch.
    out_j, grads_j = _nnx_fwd_bwd(module, _to_jax(x), _to_jax(grad_out))
    assert _bits_equal(_to_jax(out_t), out_j)
    assert set(grads_t) == set(grads_j)
    for name in grads_t:
        assert _bits_equal(_to_jax(grads_t[name]), grads_j[name].astype(dtype)), name
    # Plain module call (no jit) gives the same output.
    assert _bits_equal(module(_to_jax(x)), out_j)


# swiglu without a gate: tests/test_examples.py (same losses as torch); the gate runs every line
# of the ungated path.
@pytest.mark.parametrize("activation", ["geglu", "relu2"])
def test_shared_expert_matches_torch_layer_and_float64_reference(activation):
    kwargs = dict(
        num_shared_experts=2,
        shared_ffn_dim=12,
        shared_expert_gate=True,
        use_expert_bias=True,
        activation=activation,
    )
    layer = _torch_layer(**kwargs)
    module = _nnx_from_torch(layer)
    x = torch.randn(*LEAD, D, device=DEVICE)
    grad_out = torch.randn(*LEAD, D, device=DEVICE)
    out_t, grads_t = _torch_fwd_bwd(layer, x, grad_out)
    out_j, grads_j = _nnx_fwd_bwd(module, _to_jax(x), _to_jax(grad_out))

    ref_layer = _torch_layer(torch.float64, device="cpu", **kwargs)
    ref_layer.load_state_dict(layer.state_dict())
    params = dict(ref_layer.named_parameters())
    xr = x.cpu().double().requires_grad_(True)
    ref = torch_reference(
        xr,
        params["router_weight"],
        params["w_up"],
        params["w_down"],
        K,
        activation=activation,
        expert_bias=ref_layer.expert_bias,
        shared_w_up=params["shared_w_up"],
        shared_w_down=params["shared_w_down"],
        shared_gate_weight=params["shared_gate_weight"],
    )
    grads_r = torch.autograd.grad(ref, [xr, *params.values()], grad_out.cpu().double())
    grads_r = dict(zip(["x", *params], grads_r))

    assert _rel(out_j, ref.detach()) < TOL32
    assert _rel(out_t, ref.detach()) < TOL32
    assert set(grads_j) == set(grads_r)
    for name in grads_r:
        assert _rel(grads_j[name], grads_r[name]) < TOL32, name
        assert _rel(grads_t[name], grads_r[name]) < TOL32, name


def test_module_equals_functional_call_with_its_params():
    module = jnnx.FusedMoE(D, F, E, K, score_func="sigmoid", use_expert_bias=True, rngs=nnx.Rngs(_key()))
    x = jax.random.normal(_key(), (*LEAD, D))
    p = module.params_dict()
    out_unbiased, aux_unbiased = fused_moe(
        x, p["router_weight"], p["w_up"], p["w_down"], K, score_func="sigmoid", return_aux=True
    )
    # Sigmoid scores lie in (0, 1), so a bias of 2 forces the K least-loaded experts onto every
    # token: at least one token's selection changes, whatever the random weights are.
    forced = np.argsort(np.asarray(aux_unbiased["tokens_per_expert"]), kind="stable")[:K]
    module.expert_bias[...] = jnp.zeros((E,)).at[forced].set(2.0)
    out, aux = module(x, return_aux=True)
    p = module.params_dict()
    out_f, aux_f = fused_moe(
        x,
        p["router_weight"],
        p["w_up"],
        p["w_down"],
        K,
        score_func="sigmoid",
        expert_bias=p["expert_bias"],
        return_aux=True,
    )
    assert _bits_equal(out, out_f)
    for name in aux_f:
        assert _bits_equal(aux[name], aux_f[name]), name
    expected_load = np.zeros(E, np.int64)
    expected_load[forced] = math.prod(LEAD)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), expected_load)
    # The bias steers selection: without it the output changes.
    assert not _bits_equal(out, out_unbiased)


def test_nnx_and_linen_agree():
    kwargs = dict(num_shared_experts=1, shared_ffn_dim=12, shared_expert_gate=True, use_expert_bias=True)
    module = jnnx.FusedMoE(D, F, E, K, **kwargs, rngs=nnx.Rngs(_key()))
    module.expert_bias[...] = jax.random.normal(_key(), (E,)) * 0.1
    lin = jlinen.FusedMoE(D, F, E, K, **kwargs)
    x = jax.random.normal(_key(), (*LEAD, D))
    fresh = jax.eval_shape(lin.init, _key(), x)  # shapes and dtypes only
    assert set(fresh) == {"params", "buffers"}
    assert jax.tree.map(
        lambda a: (a.shape, a.dtype), {**fresh["params"], **fresh["buffers"]}
    ) == jax.tree.map(lambda a: (a.shape, a.dtype), module.params_dict())
    variables = convert.torch_state_dict_to_linen_variables(convert.nnx_to_torch_state_dict(module))

    def linen_loss(params, x):
        out, aux = lin.apply({"params": params, "buffers": variables["buffers"]}, x, return_aux=True)
        return jnp.sum(out * x) + aux["load_balance_loss"], out

    def nnx_loss(module, x):
        out, aux = module(x, return_aux=True)
        return jnp.sum(out * x) + aux["load_balance_loss"], out

    (loss_l, out_l), grads_l = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(variables["params"], x)
    (loss_n, out_n), grads_n = nnx.jit(nnx.value_and_grad(nnx_loss, has_aux=True))(module, x)
    assert _bits_equal(out_l, out_n) and _bits_equal(loss_l, loss_n)
    grads_n = {k: v[...] for k, v in grads_n.items()}
    assert set(grads_n) == set(grads_l) == set(fresh["params"])  # expert_bias is not trained
    for name in grads_l:
        assert _bits_equal(grads_l[name], grads_n[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trips_exactly(dtype):
    layer = _torch_layer(dtype, num_shared_experts=1, shared_expert_gate=True, use_expert_bias=True)
    sd = layer.state_dict()
    assert set(sd) == set(convert.PARAM_NAMES + convert.BUFFER_NAMES)

    flat = convert.torch_state_dict_to_jax(sd)
    back = convert.jax_params_to_torch_state_dict(flat)
    via_nnx = convert.nnx_to_torch_state_dict(_nnx_from_torch(layer, param_dtype=flat["w_up"].dtype))
    via_linen = convert.linen_variables_to_torch_state_dict(convert.torch_state_dict_to_linen_variables(sd))
    for result in (back, via_nnx, via_linen):
        assert set(result) == set(sd)
        for name, t in sd.items():
            # the converters return host tensors; the layer may live on the GPU
            assert result[name].dtype == t.dtype and torch.equal(result[name].cpu(), t.cpu()), name

    # Inside a model's state_dict: only the prefixed entries, and back under the same prefix.
    model_sd = {"embed.weight": torch.randn(3, D), **{f"blocks.0.moe.{k}": v for k, v in sd.items()}}
    flat = convert.torch_state_dict_to_jax(model_sd, prefix="blocks.0.moe.")
    assert set(flat) == set(sd)
    again = convert.jax_params_to_torch_state_dict(flat, prefix="blocks.0.moe.")
    assert all(torch.equal(again[f"blocks.0.moe.{k}"].cpu(), v.cpu()) for k, v in sd.items())
    fresh = flashfusemoe.MoELayer(
        D, F, E, K, num_shared_experts=1, shared_expert_gate=True, use_expert_bias=True, dtype=dtype
    )
    fresh.load_state_dict(convert.jax_params_to_torch_state_dict(convert.torch_state_dict_to_jax(sd)))
    assert all(torch.equal(fresh.state_dict()[k].cpu(), v.cpu()) for k, v in sd.items())


def test_converters_reject_mismatches():
    layer = _torch_layer()
    with pytest.raises(ValueError, match="not a MoELayer parameter"):
        convert.torch_state_dict_to_jax({**layer.state_dict(), "other.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="no state_dict entry"):
        convert.torch_state_dict_to_jax(layer.state_dict(), prefix="moe.")
    module = jnnx.FusedMoE(D, F, E, K, use_expert_bias=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected entries"):
        convert.load_torch_state_dict_into_nnx(module, layer.state_dict())  # no expert_bias
    wrong = _torch_layer(use_expert_bias=True)
    wide = flashfusemoe.MoELayer(D, 2 * F, E, K, use_expert_bias=True).state_dict()
    with pytest.raises(ValueError, match="w_up must have shape"):
        convert.load_torch_state_dict_into_nnx(module, {**wrong.state_dict(), "w_up": wide["w_up"]})
    # Wrong types: a clear TypeError/ValueError naming the entry, not an AttributeError or KeyError.
    sd = wrong.state_dict()
    with pytest.raises(TypeError, match=r"state_dict\['w_up'\] must be a torch.Tensor, got ndarray"):
        convert.torch_state_dict_to_jax({**sd, "w_up": sd["w_up"].cpu().numpy()})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        convert.torch_state_dict_to_jax(list(sd.values()))
    with pytest.raises(TypeError, match="w_up must be real, got dtype complex64"):
        convert.load_torch_state_dict_into_nnx(module, {**sd, "w_up": sd["w_up"].to(torch.complex64)})
    with pytest.raises(TypeError, match="module must be a jax_bridge.nnx.FusedMoE"):
        convert.load_torch_state_dict_into_nnx(wrong, sd)
    with pytest.raises(TypeError, match="layer must be a flashfusemoe.MoELayer"):
        jnnx.FusedMoE.from_torch(module)
    with pytest.raises(TypeError, match="w_up must be a floating array, got dtype object"):
        convert.jax_params_to_torch_state_dict({"w_up": None})
    with pytest.raises(ValueError, match="variables must hold a 'params' collection"):
        convert.linen_variables_to_torch_state_dict({"buffers": {}})


@pytest.mark.parametrize("kwargs, match", [
    (dict(param_dtype=jnp.int32), "param_dtype must be a floating dtype"),  # used to give all-zero weights
    (dict(param_dtype=jnp.complex64), "param_dtype must be a floating dtype"),
    (dict(dtype=jnp.int32), "dtype must be a floating dtype or None"),
    (dict(dtype="bogus"), "dtype must be a floating dtype or None"),
])
def test_flax_dtypes_must_be_floating(kwargs, match):
    with pytest.raises(TypeError, match=match):
        jnnx.FusedMoE(D, F, E, K, **kwargs, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=match):
        jlinen.FusedMoE(D, F, E, K, **kwargs).init(jax.random.key(0), jnp.zeros((2, D)))


def _uniform_ok(w, bound):
    """|w| <= bound, the extremes reached, std = bound / sqrt(3) (5% margin: > 7 sigma at >= 4096 values)."""
    w = np.asarray(w, np.float64)
    assert np.max(np.abs(w)) <= bound * (1 + 2**-8)  # bf16 storage may round up to the bound
    assert np.max(np.abs(w)) > 0.9 * bound  # P(miss) = 0.9**n, n >= 256
    if w.size >= 4096:
        assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05


def test_initialisers_match_torch_scales():
    d, f, e, fs = 256, 32, 8, 48
    kwargs = dict(num_shared_experts=1, shared_ffn_dim=fs, shared_expert_gate=True, use_expert_bias=True)
    fan_in = {
        "router_weight": d,
        "w_up": d,
        "w_down": f,
        "shared_w_up": d,
        "shared_w_down": fs,
        "shared_gate_weight": d,
    }
    module = jnnx.FusedMoE(d, f, e, 2, **kwargs, rngs=nnx.Rngs(_key()))
    torch_layer = flashfusemoe.MoELayer(d, f, e, 2, **kwargs)
    p = module.params_dict()
    assert set(p) == set(fan_in) | {"expert_bias"}
    for name, fan in fan_in.items():
        assert p[name].dtype == jnp.float32
        assert p[name].shape == tuple(getattr(torch_layer, name).shape)
        _uniform_ok(p[name], 1 / math.sqrt(fan))
        _uniform_ok(getattr(torch_layer, name).detach(), 1 / math.sqrt(fan))
    assert p["expert_bias"].dtype == jnp.float32 and not np.any(np.asarray(p["expert_bias"]))
    # Linen draws its own values with the same initialiser (D=16: bound 0.25; F=8: bound 0.354).
    lin = jlinen.FusedMoE(16, 8, 4, 2, use_expert_bias=True)
    variables = lin.init(_key(), jnp.zeros((2, 16)))
    _uniform_ok(variables["params"]["w_up"], 0.25)
    _uniform_ok(variables["params"]["w_down"], 1 / math.sqrt(8))
    assert variables["buffers"]["expert_bias"].dtype == jnp.float32
    assert not np.any(np.asarray(variables["buffers"]["expert_bias"]))


def test_param_dtype_and_compute_dtype():
    key = _key()
    x = jax.random.normal(_key(), (*LEAD, D))
    bf16_params = jnnx.FusedMoE(D, F, E, K, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(key))
    assert all(v.dtype == jnp.bfloat16 for v in bf16_params.params_dict().values())
    # dtype=None promotes bf16 params with an f32 input: f32 compute on the upcast values.
    out = bf16_params(x)
    assert out.dtype == jnp.float32
    p32 = {k: v.astype(jnp.float32) for k, v in bf16_params.params_dict().items()}
    assert _bits_equal(out, fused_moe(x, p32["router_weight"], p32["w_up"], p32["w_down"], K))
    # An explicit compute dtype casts input and params.
    f32_params = jnnx.FusedMoE(D, F, E, K, dtype=jnp.bfloat16, rngs=nnx.Rngs(key))
    assert all(v.dtype == jnp.float32 for v in f32_params.params_dict().values())
    out = f32_params(x)
    assert out.dtype == jnp.bfloat16
    pb = {k: v.astype(jnp.bfloat16) for k, v in f32_params.params_dict().items()}
    assert _bits_equal(
        out, fused_moe(x.astype(jnp.bfloat16), pb["router_weight"], pb["w_up"], pb["w_down"], K)
    )
    lin = jlinen.FusedMoE(D, F, E, K, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    out, variables = lin.init_with_output(_key(), x)
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.bfloat16 for v in variables["params"].values())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shared_ffn_dim=8), ValueError, "num_shared_experts=0"),
        (dict(shared_expert_gate=True), ValueError, "shared_expert_gate"),
        (dict(top_k=E + 1), ValueError, "top_k"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(n_group=3, topk_group=1), ValueError, "n_group"),
        (dict(d_model=16.0), TypeError, "d_model"),
        (dict(use_expert_bias="no"), TypeError, "use_expert_bias must be a bool"),
        (dict(gemm="grouped", max_tokens_per_expert=4), ValueError, "max_tokens_per_expert=4"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, error, match):
    full = {**dict(d_model=D, ffn_dim=F, num_experts=E, top_k=K), **kwargs}
    with pytest.raises(error, match=match):
        jnnx.FusedMoE(**full, rngs=nnx.Rngs(0))
    with pytest.raises(error, match=match):
        jlinen.FusedMoE(**full).init(jax.random.key(0), jnp.zeros((2, D)))
    torch_kwargs = {k: v for k, v in full.items() if k not in ("d_model", "ffn_dim", "num_experts", "top_k")}
    with pytest.raises(error, match=match):
        flashfusemoe.MoELayer(full["d_model"], F, E, full["top_k"], **torch_kwargs)


def test_compare_tool_passes():
    argv = "--shape 24 16 8 4 2 --dtype f32 --expert-bias --score-func sigmoid".split()
    assert compare.main(argv) == 0


def test_compare_table_flags_broken_bounds():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    truth = [rng.standard_normal((6, 4)).astype(np.float32) for _ in compare.QUANTITIES]
    nudged = [t * np.float32(1 + 2**-20) for t in truth]  # 1e-6 relative: within every reference bound
    results = {
        "torch-ref": truth,
        "jax-ref": truth,
        "torch-native": truth,
        "bridge": [*truth[:3], *nudged[3:]],
    }
    rows = compare.compare(results, "f32")
    assert len(rows) == 25
    broken = {(pair, q) for pair, q, *_, ok in rows if not ok}
    assert broken == {("bridge vs torch-native", "grad_w_up"), ("bridge vs torch-native", "grad_w_down")}
    results["jax-ref"] = [t * np.float32(1 + 3e-5) for t in truth]  # above the f32 bound of 1e-5
    broken = {pair for pair, *_, ok in compare.compare(results, "f32") if not ok}
    assert broken == {"jax-ref vs torch-ref", "bridge vs jax-ref", "bridge vs torch-native"}
    assert not [r for r in compare.compare(results, "bf16") if not r[-1] and "native" not in r[0]]


def test_nnx_update_expert_bias_matches_the_torch_layer():
    """The same loads give the NNX module's bias the torch layer's update; without a bias: ValueError."""
    layer = flashfusemoe.MoELayer(16, 8, 4, 1, use_expert_bias=True)
    module = jnnx.FusedMoE.from_torch(layer)
    x = torch.randn(10, 16)
    layer(x)
    loads = layer.last_routing_stats["tokens_per_expert"]
    _, aux = module(jnp.asarray(x.numpy()), return_aux=True)
    assert np.array_equal(np.asarray(aux["tokens_per_expert"]), loads.numpy())
    layer.update_expert_bias(0.125)
    module.update_expert_bias(aux["tokens_per_expert"], 0.125)
    assert np.array_equal(np.asarray(module.expert_bias[...]), layer.expert_bias.numpy())
    assert np.any(layer.expert_bias.numpy() != 0)
    with pytest.raises(ValueError, match="use_expert_bias=True"):
        jnnx.FusedMoE(16, 8, 4, 1, rngs=nnx.Rngs(0)).update_expert_bias(aux["tokens_per_expert"], 0.1)
