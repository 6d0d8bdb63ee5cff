"""Bad input raises ValueError/TypeError naming the argument, its value and what was expected."""

import math

import pytest
import torch
from moe_cases import random_moe

import flashfusemoe
from flashfusemoe.config import MoEOptions


@pytest.fixture
def tensors():
    return random_moe(N=4, D=8, F=4, E=4)


def _call(tensors, top_k=2, **kw):
    x, r, u, d = tensors
    return flashfusemoe.fused_moe(kw.pop("x", x), kw.pop("router_weight", r), kw.pop("w_up", u),
                                  kw.pop("w_down", d), top_k, **kw)


BAD_CALLS = [
    # (kwargs, exception, substrings the message must contain)
    (dict(x=torch.randn(())), ValueError, ["x", "at least one dimension"]),
    (dict(x=torch.randn(4, 9, dtype=torch.float64)), ValueError, ["router_weight", "D=9"]),
    (dict(router_weight=torch.randn(4, 8, 1, dtype=torch.float64)), ValueError, ["router_weight", "rank 2"]),
    (dict(w_up=torch.randn(4, 7, 8, dtype=torch.float64)), ValueError, ["w_up", "even"]),
    (dict(w_up=torch.randn(5, 8, 8, dtype=torch.float64)), ValueError, ["w_up", "E=4"]),
    (dict(w_down=torch.randn(4, 8, 3, dtype=torch.float64)), ValueError, ["w_down", "F=4"]),
    (dict(w_down=torch.randn(4, 8, dtype=torch.float64)), ValueError, ["w_down", "rank 3"]),
    (dict(top_k=0), ValueError, ["top_k=0", ">= 1"]),
    (dict(top_k=5), ValueError, ["top_k=5", "num_experts=4"]),
    (dict(top_k=2.0), TypeError, ["top_k", "int"]),
    (dict(activation="gelu"), ValueError, ["activation", "'gelu'", "swiglu"]),
    (dict(score_func="tanh"), ValueError, ["score_func", "'tanh'"]),
    (dict(gemm="cutlass"), ValueError, ["gemm", "'cutlass'"]),
    (dict(x=torch.randn(4, 8, dtype=torch.float32)), TypeError, ["router_weight", "float64", "float32"]),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, ["x", "floating"]),
    (dict(x=torch.randn(4, 8, dtype=torch.float64, device="meta")), ValueError, ["device"]),
    (dict(capacity_factor=math.inf), ValueError, ["capacity_factor=inf"]),
    (dict(capacity_factor=math.nan), ValueError, ["capacity_factor=nan"]),
    (dict(capacity_factor=-1.0), ValueError, ["capacity_factor=-1.0"]),
    (dict(max_tokens_per_expert=-3), ValueError, ["max_tokens_per_expert=-3"]),
    (dict(routed_scaling_factor=-2.0), ValueError, ["routed_scaling_factor=-2.0"]),
    (dict(routed_scaling_factor=math.inf), ValueError, ["routed_scaling_factor=inf"]),
    (dict(n_group=3, topk_group=1), ValueError, ["n_group=3", "num_experts=4"]),
    (dict(n_group=2, topk_group=3), ValueError, ["topk_group=3", "n_group=2"]),
    (dict(n_group=2), ValueError, ["n_group=2", "topk_group=None"]),
    (dict(n_group=4, topk_group=1, top_k=2), ValueError, ["top_k=2", "topk_group=1"]),
    (dict(expert_bias=torch.zeros(3)), ValueError, ["expert_bias", "E=4"]),
    (dict(expert_bias=torch.zeros(4, dtype=torch.int32)), TypeError, ["expert_bias", "int32"]),
    (dict(expert_bias=[0.0] * 4), TypeError, ["expert_bias", "list"]),
    (dict(x=[[1.0] * 8]), TypeError, ["x", "torch.Tensor"]),
    (dict(norm_topk_prob="yes"), TypeError, ["norm_topk_prob"]),
    (dict(return_aux="yes"), TypeError, ["return_aux", "'yes'"]),
    (dict(routed_scaling_factor=10**400), ValueError, ["routed_scaling_factor=1000", "finite"]),
    (dict(gemm="grouped", max_tokens_per_expert=4), ValueError,
     ["max_tokens_per_expert=4", "gemm='grouped'"]),
    (dict(gemm="bmm", max_tokens_per_expert=4, capacity_factor=1.0), ValueError,
     ["max_tokens_per_expert=4", "capacity_factor=1.0"]),
    (dict(x=torch.empty(4, 8, dtype=torch.float64, device="meta"),
          router_weight=torch.empty(4, 8, dtype=torch.float64, device="meta"),
          w_up=torch.empty(4, 8, 8, dtype=torch.float64, device="meta"),
          w_down=torch.empty(4, 8, 4, dtype=torch.float64, device="meta")), ValueError, ["x", "meta device"]),
]


@pytest.mark.parametrize("kwargs,exc,words", BAD_CALLS, ids=[str(list(c[0])) + str(i) for i, c in
                                                             enumerate(BAD_CALLS)])
def test_bad_input_raises_clear_error(tensors, kwargs, exc, words):
    with pytest.raises(exc) as info:
        _call(tensors, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_options_are_frozen_and_hashable():
    opts = MoEOptions(top_k=2)
    with pytest.raises(AttributeError):
        opts.top_k = 3
    assert hash(opts) == hash(MoEOptions(top_k=2))


def test_make_options_reuses_a_validated_result_but_still_rejects_bad_values():
    from flashfusemoe.config import make_options

    a = make_options(2, {"gemm": "grouped", "norm_topk_prob": True}, "f")
    assert make_options(2, {"gemm": "grouped", "norm_topk_prob": True}, "f") is a
    assert make_options(2, {"gemm": "grouped", "norm_topk_prob": False}, "f") is not a
    # 1 == True as a dict key: the cached True must not let the int through unchecked
    with pytest.raises(TypeError, match="norm_topk_prob"):
        make_options(2, {"gemm": "grouped", "norm_topk_prob": 1}, "f")
    with pytest.raises(TypeError, match="unexpected keyword"):
        make_options(2, {"gemm": "grouped", "bogus": 1}, "f")
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        make_options(2, {"routed_scaling_factor": math.inf}, "f")
    with pytest.raises(ValueError, match="activation"):  # unhashable: not cached, still checked
        make_options(2, {"activation": ["swiglu"]}, "f")


def test_no_bare_asserts_in_library():
    """Validation must survive python -O."""
    import pathlib

    root = pathlib.Path(flashfusemoe.__file__).parent
    files = [*root.rglob("*.py"), *(root.parent / "jax_bridge").rglob("*.py")]
    offenders = [str(p) for p in files if any(
        line.lstrip().startswith("assert ") for line in p.read_text().splitlines())]
    assert not offenders, offenders


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_huge_capacity_factor_drops_nothing(tensors, gemm):
    """A capacity above N tokens keeps every assignment (was an OverflowError in the kernel launch)."""
    x, r, u, d = tensors
    out, aux = flashfusemoe.fused_moe(x, r, u, d, 2, gemm=gemm, capacity_factor=1e300, return_aux=True)
    assert int(aux["dropped_tokens"]) == 0
    assert torch.equal(out, flashfusemoe.fused_moe(x, r, u, d, 2, gemm=gemm))


def test_layer_validation():
    with pytest.raises(ValueError, match="shared_ffn_dim=16"):
        flashfusemoe.MoELayer(8, 4, 4, 2, shared_ffn_dim=16)
    with pytest.raises(ValueError, match="num_experts=0"):
        flashfusemoe.MoELayer(8, 4, 0, 1)
    with pytest.raises(ValueError, match="top_k=3"):
        flashfusemoe.MoELayer(8, 4, 2, 3)
    with pytest.raises(TypeError, match="dtype must be None or one of .* got torch.int32"):
        flashfusemoe.MoELayer(8, 4, 4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="use_expert_bias must be a bool, got 'no'"):
        flashfusemoe.MoELayer(8, 4, 4, 2, use_expert_bias="no")
    with pytest.raises(TypeError, match="shared_expert_gate must be a bool, got 'no'"):
        flashfusemoe.MoELayer(8, 4, 4, 2, num_shared_experts=1, shared_expert_gate="no")
    with pytest.raises(ValueError, match="max_tokens_per_expert=4"):
        flashfusemoe.MoELayer(8, 4, 4, 2, gemm="grouped", max_tokens_per_expert=4)
    layer = flashfusemoe.MoELayer(8, 4, 4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="return_aux must be a bool, got 1"):
        layer(torch.randn(3, 8, dtype=torch.float64), return_aux=1)
    meta = flashfusemoe.MoELayer(8, 4, 4, 2, device="meta")
    with pytest.raises(ValueError, match="x is on the meta device"):
        meta(torch.empty(3, 8, device="meta"))


def _router_problem():
    x, r, _, _ = random_moe(N=10, D=8, F=4, E=4)
    return [x], r


BAD_CALIBRATIONS = [
    # (kwargs, exception, substrings); the wrong-D batch and the [3] bias used to return a number
    (dict(batches=torch.randn(10, 8, dtype=torch.float64)), TypeError, ["batches", "[x]"]),
    (dict(batches=[torch.randn(10, 7, dtype=torch.float64)]), ValueError, ["router_weight", "D=7"]),
    (dict(batches=[torch.randn(10, 8)]), TypeError, ["router_weight", "batches[0]", "float32"]),
    (dict(batches=[torch.ones(10, 8, dtype=torch.int64)]), TypeError, ["batches[0]", "floating"]),
    (dict(router_weight=torch.randn(1, 4, 8, dtype=torch.float64)), ValueError, ["router_weight", "rank 2"]),
    (dict(expert_bias=torch.zeros(3)), ValueError, ["expert_bias", "E=4"]),
    (dict(expert_bias=torch.zeros(4, dtype=torch.int32)), TypeError, ["expert_bias", "int32"]),
    (dict(margin="0.1"), TypeError, ["margin", "'0.1'"]),
    (dict(multiple=0), ValueError, ["multiple=0", ">= 1"]),
    (dict(multiple=2.5), TypeError, ["multiple", "int"]),
    (dict(top_k=5), ValueError, ["top_k=5", "num_experts=4"]),
]


@pytest.mark.parametrize("kwargs,exc,words", BAD_CALIBRATIONS,
                         ids=[str(list(c[0])) + str(i) for i, c in enumerate(BAD_CALIBRATIONS)])
def test_calibrate_max_tokens_bad_input(kwargs, exc, words):
    batches, r = _router_problem()
    args = {"batches": batches, "router_weight": r, "top_k": 2, **kwargs}
    with pytest.raises(exc) as info:
        flashfusemoe.calibrate_max_tokens(args.pop("batches"), args.pop("router_weight"), args.pop("top_k"),
                                          **args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


BAD_AUX = [
    (dict(score_func="tanh"), ValueError, ["score_func='tanh'"]),  # used to run as sigmoid
    (dict(tokens_per_expert=torch.ones(1, dtype=torch.int32)), ValueError, ["tokens_per_expert", "E=4"]),
    (dict(tokens_per_expert=torch.ones(3, dtype=torch.int32)), ValueError, ["tokens_per_expert", "E=4"]),
    (dict(logits=torch.randn(4)), ValueError, ["logits", "[N, E]"]),
    (dict(logits=torch.ones(6, 4, dtype=torch.int64)), TypeError, ["logits", "floating"]),
    (dict(tokens_per_expert=[1, 1, 1, 1]), TypeError, ["tokens_per_expert", "list"]),
]


@pytest.mark.parametrize("kwargs,exc,words", BAD_AUX,
                         ids=[str(list(c[0])) + str(i) for i, c in enumerate(BAD_AUX)])
def test_aux_losses_bad_input(kwargs, exc, words):
    args = {"logits": torch.randn(6, 4), "tokens_per_expert": torch.full((4,), 3, dtype=torch.int32),
            "score_func": "softmax", **kwargs}
    with pytest.raises(exc) as info:
        flashfusemoe.aux_losses(**args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


# (changed tensors of the N=4, D=8, F=4, E=4 problem) -> (the tensor to blame, the size it must have)
MISMATCHES = [
    (dict(x=torch.randn(4, 9, dtype=torch.float64)), "x", "D=8"),
    (dict(router_weight=torch.randn(4, 9, dtype=torch.float64)), "router_weight", "D=8"),
    (dict(w_up=torch.randn(4, 8, 9, dtype=torch.float64)), "w_up", "D=8"),
    (dict(w_down=torch.randn(4, 9, 4, dtype=torch.float64)), "w_down", "D=8"),
    (dict(router_weight=torch.randn(5, 8, dtype=torch.float64)), "router_weight", "E=4"),
    (dict(w_up=torch.randn(5, 8, 8, dtype=torch.float64)), "w_up", "E=4"),
    (dict(w_down=torch.randn(5, 8, 4, dtype=torch.float64)), "w_down", "E=4"),
    # x and the router's E both wrong: x is named first
    (dict(x=torch.randn(4, 9, dtype=torch.float64), router_weight=torch.randn(5, 8, dtype=torch.float64)),
     "x", "D=8"),
]


@pytest.mark.parametrize("kwargs,culprit,size", MISMATCHES,
                         ids=[f"{sorted(c[0])}-{c[1]}-{c[2]}" for c in MISMATCHES])
def test_shape_error_names_the_tensor_that_disagrees(tensors, kwargs, culprit, size):
    with pytest.raises(ValueError) as info:
        _call(tensors, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{culprit} has "), message
    assert f"{culprit} must be [" in message and size in message, message


def test_dtype_errors_name_dtypes_without_the_torch_prefix(tensors):
    """The same text reaches JAX users (jax_bridge runs these checks), who pass jnp dtypes."""
    for kwargs in (dict(x=torch.ones(4, 8, dtype=torch.int32)), dict(w_up=tensors[2].float()),
                   dict(expert_bias=torch.zeros(4, dtype=torch.int32))):
        with pytest.raises(TypeError) as info:
            _call(tensors, **kwargs)
        assert "torch." not in str(info.value) and "32" in str(info.value), str(info.value)
