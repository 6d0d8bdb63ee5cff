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


def test_no_bare_asserts_in_library():
    """Validation must survive python -O."""
    import pathlib

    root = pathlib.Path(flashfusemoe.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if any(
        line.lstrip().startswith("assert ") for line in p.read_text().splitlines())]
    assert not offenders, offenders


def test_layer_validation():
    with pytest.raises(ValueError, match="shared_ffn_dim=16"):
        flashfusemoe.MoELayer(8, 4, 4, 2, shared_ffn_dim=16)
    with pytest.raises(ValueError, match="num_experts=0"):
        flashfusemoe.MoELayer(8, 4, 0, 1)
    with pytest.raises(ValueError, match="top_k=3"):
        flashfusemoe.MoELayer(8, 4, 2, 3)
