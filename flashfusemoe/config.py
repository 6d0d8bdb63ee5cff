"""Options of the fused MoE layer, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACTIVATIONS = ("swiglu", "geglu", "relu2")
SCORE_FUNCS = ("softmax", "sigmoid")
GEMMS = ("auto", "grouped", "bmm")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def _check_positive_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} must be a finite number > 0")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


@dataclass(frozen=True)
class MoEOptions:
    """Everything about one MoE call except its tensors. Checked on construction."""

    top_k: int
    activation: str = "swiglu"
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None
    gemm: str = "auto"
    max_tokens_per_expert: int | None = None
    recompute: bool = False

    def __post_init__(self):
        check_int("top_k", self.top_k, minimum=1)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("gemm", self.gemm, GEMMS)
        for name in ("norm_topk_prob", "recompute"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                f"n_group={self.n_group} and topk_group={self.topk_group} must be given together"
            )
        if self.n_group is not None:
            check_int("n_group", self.n_group, minimum=1)
            check_int("topk_group", self.topk_group, minimum=1)
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        _check_positive_finite("routed_scaling_factor", self.routed_scaling_factor)
        if self.capacity_factor is not None:
            _check_positive_finite("capacity_factor", self.capacity_factor)
        if self.max_tokens_per_expert is not None:
            check_int("max_tokens_per_expert", self.max_tokens_per_expert, minimum=1)

    def check_num_experts(self, num_experts: int) -> None:
        """Checks the options that depend on E."""
        if self.top_k > num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={num_experts}")
        if self.n_group is None:
            return
        if num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={num_experts}")
        allowed = self.topk_group * (num_experts // self.n_group)
        if self.top_k > allowed:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {allowed} experts that topk_group={self.topk_group} "
                f"of n_group={self.n_group} groups leave"
            )

    def capacity(self, num_tokens: int, num_experts: int) -> int:
        """Assignments each expert keeps in capacity mode: ``ceil(cf * N * top_k / E)``."""
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / num_experts)

    def heuristic_max_tokens(self, num_tokens: int, num_experts: int) -> int:
        """The seed's padded-layout size: mean load + 100%, never more than N."""
        return max(1, min(num_tokens, 2 * math.ceil(num_tokens * self.top_k / num_experts)))


def check_layer_args(d_model, ffn_dim, num_experts, num_shared_experts, shared_ffn_dim,
                     shared_expert_gate) -> None:
    """Checks the layer-level hyperparameters of ``MoELayer`` (and of the Flax modules)."""
    for name, value in (("d_model", d_model), ("ffn_dim", ffn_dim), ("num_experts", num_experts)):
        check_int(name, value, minimum=1)
    check_int("num_shared_experts", num_shared_experts, minimum=0)
    if shared_ffn_dim is not None:
        check_int("shared_ffn_dim", shared_ffn_dim, minimum=1)
        if num_shared_experts == 0:
            raise ValueError(f"shared_ffn_dim={shared_ffn_dim} given but num_shared_experts=0")
    if shared_expert_gate and num_shared_experts == 0:
        raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_inputs(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions):
    """Checks tensor types, ranks, shapes, dtypes and devices. Returns ``(D, E, F)``."""
    named = {"x": x, "router_weight": router_weight, "w_up": w_up, "w_down": w_down}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype in {FLOAT_DTYPES}, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must be [..., D] with at least one dimension, got {_describe(x)}")
    for name, rank in (("router_weight", 2), ("w_up", 3), ("w_down", 3)):
        if named[name].dim() != rank:
            raise ValueError(f"{name} must have rank {rank}, got {_describe(named[name])}")
    D = x.shape[-1]
    E = router_weight.shape[0]
    if router_weight.shape[1] != D:
        raise ValueError(f"router_weight must be [E, D={D}], got {_describe(router_weight)}")
    if w_up.shape[0] != E or w_up.shape[2] != D:
        raise ValueError(f"w_up must be [E={E}, 2F, D={D}], got {_describe(w_up)}")
    if w_up.shape[1] % 2:
        raise ValueError(f"w_up must have an even number of rows (gate and up halves), got {w_up.shape[1]}")
    F = w_up.shape[1] // 2
    if tuple(w_down.shape) != (E, D, F):
        raise ValueError(f"w_down must be [E={E}, D={D}, F={F}], got {_describe(w_down)}")
    if E < 1 or D < 1 or F < 1:
        raise ValueError(f"E={E}, D={D} and F={F} must all be >= 1")
    device, dtype = x.device, x.dtype
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; all must share a device")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype}; all must share a dtype")
    if expert_bias is not None:
        if not isinstance(expert_bias, torch.Tensor):
            raise TypeError(f"expert_bias must be a torch.Tensor or None, got {type(expert_bias).__name__}")
        if tuple(expert_bias.shape) != (E,):
            raise ValueError(f"expert_bias must be [E={E}], got {_describe(expert_bias)}")
        if expert_bias.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"expert_bias must be float32 or float64, got {expert_bias.dtype}")
        if expert_bias.device != device:
            raise ValueError(f"expert_bias is on {expert_bias.device} but x is on {device}")
    options.check_num_experts(E)
    return D, E, F
