"""benchmarks.flax_model: the Flax NNX seed model against the torch one (float64), and the bridge
layer under ``nnx.scan`` and ``nnx.remat``, gradients included (real kernels, interpreted)."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import train  # noqa: E402
from benchmarks.flax_model import (  # noqa: E402
    RaggedDotMoE,
    SeedModel,
    load_torch_state_dict,
    param_count,
    to_numpy_state_dict,
)

CFG = dataclasses.replace(train.TINY, n_layers=3)  # a dense block and two MoE blocks: the scan iterates
AUX_COEF = 0.5  # large enough that the load-balance gradient shows in the router's


@pytest.fixture(autouse=True)
def _full_precision():
    """fp32 dots at full precision where JAX would use TF32 (GPU machines run these tests too)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def problem():
    """The torch model's initial weights, one batch, and the float64 torch loss and gradients."""
    state, counts = train.initial_state(CFG, 0, "cpu")
    batch = train.make_batches(CFG, 1, 0, "cpu")[0]
    model = train.build_model("unfused-eager", CFG, "cpu").double()
    model.load_state_dict(state)
    ce, aux = model(batch[:, :-1], batch[:, 1:])
    (ce + AUX_COEF * aux).backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    # embed.weight is tied: named_parameters lists it once; the state_dict has every entry.
    assert set(grads) == set(state)
    tokens = jnp.asarray(batch.numpy().astype(np.int32))
    return state, counts, tokens, ce.item(), aux.item(), grads


def build(state, moe, scan, remat):
    model = SeedModel(CFG, moe, scan=scan, remat=remat, dtype=jnp.float32, rngs=nnx.Rngs(1))
    load_torch_state_dict(model, state)
    return model


def loss_and_grads(model, tokens):
    """(ce, aux, {torch name: gradient of ce + AUX_COEF * aux})."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest):
        def loss(p):
            ce, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1], tokens[:, 1:])
            return ce + AUX_COEF * aux, (ce, aux)

        (_, (ce, aux)), g = jax.value_and_grad(loss, has_aux=True)(params)
        return ce, aux, g

    ce, aux, g = run(params, rest)
    return float(ce), float(aux), to_numpy_state_dict(nnx.merge(graphdef, g, rest))


def assert_grads_close(got, want, rel):
    assert set(got) == set(want)
    for name, w in want.items():
        scale = float(np.abs(w).max())
        assert scale > 0, name  # every parameter gets a gradient: a zero one would hide a dropped path
        np.testing.assert_allclose(got[name], w, rtol=0, atol=rel * scale, err_msg=name)


@pytest.mark.parametrize("moe", ["bridge", "ragged_dot"])
def test_weights_round_trip_and_loss_matches_torch(problem, moe):
    state, counts, tokens, ce_ref, aux_ref, _ = problem
    for scan in (True, False):
        model = build(state, moe, scan, remat=False)
        assert param_count(model) == counts[0]
        back = to_numpy_state_dict(model)
        assert set(back) == set(state)
        for name, t in state.items():
            np.testing.assert_array_equal(back[name], t.numpy(), err_msg=name)
        ce, aux = nnx.jit(lambda m: m(tokens[:, :-1], tokens[:, 1:]))(model)
        # fp32 against the fp64 torch model: a few ulps of a ~5.5 loss
        assert abs(float(ce) - ce_ref) < 1e-5 and abs(float(aux) - aux_ref) < 1e-5, (scan, ce, aux)


def test_bridge_under_scan_and_remat_gradients_match_torch_and_pure_jax(problem):
    """Gradients of ce + aux of the bridge model under nnx.scan + nnx.remat equal the unscanned,
    un-rematerialised bridge model's, the pure-JAX (ragged_dot) model's and the float64 torch
    reference model's (moe_reference), for every parameter."""
    state, _, tokens, ce_ref, aux_ref, grads_ref = problem
    variants = [("bridge", True, True), ("bridge", False, False), ("ragged_dot", False, False)]
    runs = {v: loss_and_grads(build(state, *v), tokens) for v in variants}
    for key, (ce, aux, grads) in runs.items():
        assert abs(ce - ce_ref) < 1e-5 and abs(aux - aux_ref) < 1e-5, key
        # fp32 through three blocks against fp64: measured <= 9e-7 of each tensor's largest entry
        # (exchanging two layers' w_up gradients gives 2.3)
        assert_grads_close(grads, grads_ref, 1e-5)
    # Same kernels, other program structure: only fp32 summation order may differ. On the CPU nothing
    # differs (measured); on a GPU XLA may order a reduction of the pure-JAX blocks differently
    # (an H200: one entry of a norm weight's gradient, 1.6e-6 of that tensor's largest), so there the
    # bound is the one against float64 above.
    same_program_rel = 1e-5 if jax.default_backend() == "gpu" else 1e-6
    assert_grads_close(runs["bridge", True, True][2], runs["bridge", False, False][2], same_program_rel)


def test_load_rejects_a_state_dict_that_does_not_fit(problem):
    state = problem[0]
    model = SeedModel(CFG, "ragged_dot", scan=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="missing .'blocks.2.ffn.w_up'"):
        load_torch_state_dict(model, {k: v for k, v in state.items() if k != "blocks.2.ffn.w_up"})
    with pytest.raises(ValueError, match="unused .'extra'"):
        load_torch_state_dict(model, {**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="embed.weight: shape"):
        load_torch_state_dict(model, {**state, "embed.weight": torch.zeros(3, CFG.d_model)})


def test_model_and_ragged_layer_reject_bad_arguments():
    with pytest.raises(ValueError, match="moe must be one of"):
        SeedModel(CFG, "dense", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_layers must be >= 2"):
        SeedModel(dataclasses.replace(CFG, n_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention must be one of"):
        SeedModel(CFG, attention="flash", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity_factor=None"):
        RaggedDotMoE(8, 4, 4, 2, capacity_factor=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="score_func='softmax'"):
        RaggedDotMoE(8, 4, 4, 2, score_func="sigmoid", rngs=nnx.Rngs(0))
