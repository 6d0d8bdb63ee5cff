"""Hugging Face transformers (>= 5) on FlashFuseMoE kernels.

Two ways in, for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 (experts in the
concatenated ``gate_up_proj [E, 2F, D]`` (gate rows first) / ``down_proj [E, D, F]`` layout,
no biases, SiLU or erf-GELU):

- ``experts_implementation="flashfusemoe"``. Importing this module (or calling ``register()``)
  registers the name in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``; then
  ``from_pretrained(..., experts_implementation="flashfusemoe")``, a model built from a config
  with it, or ``model.set_experts_implementation("flashfusemoe")`` runs each experts module on
  ``flashfusemoe.moe_experts``. The model's own router still runs in torch.
- ``apply(model)``: each supported sparse-MoE block runs router + experts as one fused
  ``flashfusemoe`` call (routing kernel included); shared experts run on the model's own modules.

Either way the parameters stay the model's own tensors, so ``state_dict``, ``save_pretrained``
and ``from_pretrained`` are unchanged, and the router logits the model returns
(``output_router_logits``, its load-balancing loss) are the ones our router computed, with
their gradient. Anything else raises ``UnsupportedModelError`` naming what is unsupported;
nothing falls back silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashfusemoe.config import MoEOptions
from flashfusemoe.experts import moe_experts
from flashfusemoe.functional import moe_outputs

NAME = "flashfusemoe"

__all__ = ["NAME", "UnsupportedModelError", "apply", "experts_forward", "register", "restore"]


class UnsupportedModelError(ValueError):
    """A transformers experts module or MoE block that FlashFuseMoE cannot run exactly."""


# ---------------------------------------------------------------------------------------------
# experts_implementation="flashfusemoe"
# ---------------------------------------------------------------------------------------------


def register() -> None:
    """Registers ``"flashfusemoe"`` in transformers' ``ExpertsInterface`` (all its instances)."""
    from transformers.integrations import moe

    _transformers_symbols()
    type(moe.ALL_EXPERTS_FUNCTIONS).register(NAME, experts_forward)


_symbols = None


def _transformers_symbols() -> tuple:
    """``(default _apply_gate or None, SiLU classes, GELU classes, ReLU^2 classes)`` of the
    installed transformers. Looked up once, by ``register()``: under ``torch.compile`` the
    experts function then reads a global instead of tracing imports, which Dynamo rejects for
    transformers' lazy modules (transformers 5.17: "Bad import result")."""
    global _symbols
    if _symbols is None:
        from transformers import activations
        from transformers.integrations import moe

        silu = tuple(c for c in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if c is not None)
        gelu = tuple(c for c in (getattr(activations, "GELUActivation", None),) if c is not None)
        relu2 = tuple(c for c in (getattr(activations, "ReLUSquaredActivation", None),) if c is not None)
        _symbols = (getattr(moe, "_default_apply_gate", None), silu, gelu, relu2)
    return _symbols


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``ExpertsInterface`` function: hidden_states [N, D], top_k_index [N, K],
    top_k_weights [N, K] (any float dtype: applied in fp32, fp64 for fp64 states) -> [N, D]."""
    activation = check_experts_module(self)
    # The ids come from a top-k over E router scores: in range and distinct in a row. So no host
    # sync (a bad id still trips moe_experts' device-side asserts), and the one-launch layout.
    return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                       activation=activation, check_ids=False, distinct_ids=True)


def activation_of(act_fn) -> str:
    """Our GLU activation for a transformers ``act_fn``: SiLU -> "swiglu", erf GELU -> "geglu",
    ReLU^2 -> "relu2"; anything else raises ``UnsupportedModelError``."""
    _, silu, gelu, relu2 = _transformers_symbols()
    if isinstance(act_fn, silu) or act_fn is F.silu:
        return "swiglu"
    if isinstance(act_fn, nn.GELU) and act_fn.approximate == "none":
        return "geglu"
    if isinstance(act_fn, gelu) and getattr(act_fn, "act", None) is F.gelu:
        return "geglu"
    if isinstance(act_fn, relu2):
        return "relu2"
    raise UnsupportedModelError(
        f"flashfusemoe runs GLU experts with SiLU, exact (erf) GELU or ReLU^2 activations, not "
        f"act_fn={act_fn!r} ({type(act_fn).__name__})"
    )


def check_experts_module(experts: nn.Module) -> str:
    """Raises ``UnsupportedModelError`` naming the first thing about a transformers experts module
    that FlashFuseMoE does not run exactly. Returns its activation name."""
    name = type(experts).__name__
    flags = {
        "has_gate": (True, "non-gated experts (up_proj only)"),
        "has_bias": (False, "expert biases"),
        "is_transposed": (False, "transposed expert weights"),
        "is_concatenated": (True, "interleaved gate/up rows"),
        "has_post_expert_norm": (False, "a norm after each expert"),
        "_is_expert_parallel": (False, "transformers' expert parallelism"),
    }
    optional = ("has_post_expert_norm", "_is_expert_parallel")  # absent in older transformers
    for flag, (wanted, what) in flags.items():
        value = getattr(experts, flag, False if flag in optional else None)
        if value is not wanted:
            raise UnsupportedModelError(f"{name}: {what} ({flag}={value}) are not supported by flashfusemoe")
    default_gate = _transformers_symbols()[0]
    gate = getattr(type(experts), "_apply_gate", default_gate)
    if default_gate is None or gate is not default_gate:
        raise UnsupportedModelError(
            f"{name}: a custom _apply_gate (e.g. a clamped or scaled GLU) is not supported by flashfusemoe"
        )
    for param in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, param, None), torch.Tensor):
            raise UnsupportedModelError(f"{name} has no {param} tensor")
    return activation_of(experts.act_fn)


# ---------------------------------------------------------------------------------------------
# apply(model): router + experts fused
# ---------------------------------------------------------------------------------------------

# Block class -> (router class, routing, shared expert kind). "softmax": softmax top-k, renormalised
# when the router's norm_topk_prob (Mixtral: always); "deepseek": sigmoid + selection bias +
# group-limited top-k + routed scaling.
SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": ("MixtralTopKRouter", "softmax", None),
    "Qwen2MoeSparseMoeBlock": ("Qwen2MoeTopKRouter", "softmax", "gated"),
    "Qwen3MoeSparseMoeBlock": ("Qwen3MoeTopKRouter", "softmax", None),
    "OlmoeSparseMoeBlock": ("OlmoeTopKRouter", "softmax", None),
    "DeepseekV3MoE": ("DeepseekV3TopkRouter", "deepseek", "plain"),
}


def _is_moe_block(module: nn.Module) -> bool:
    """A module whose ``experts`` child is a transformers experts module (fused 3-D weights)."""
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) and any(
        hasattr(experts, a) for a in ("has_gate", "gate_up_proj", "up_proj"))


def _block_options(block: nn.Module) -> tuple[MoEOptions, str]:
    """The fused call's options for a supported block, and its router's logits dtype rule."""
    cls = type(block).__name__
    router_cls, routing, _ = SUPPORTED_BLOCKS[cls]
    gate = block.gate
    if type(gate).__name__ != router_cls:
        raise UnsupportedModelError(f"{cls}.gate is a {type(gate).__name__}, expected {router_cls}")
    activation = check_experts_module(block.experts)
    E = block.experts.gate_up_proj.shape[0]
    if tuple(gate.weight.shape) != (E, block.experts.gate_up_proj.shape[2]):
        raise UnsupportedModelError(
            f"{cls}: router weight {tuple(gate.weight.shape)} does not match {E} experts")
    if routing == "softmax":
        norm = True if cls == "MixtralSparseMoeBlock" else bool(gate.norm_topk_prob)
        options = MoEOptions(top_k=int(gate.top_k), activation=activation, score_func="softmax",
                             norm_topk_prob=norm)
    else:
        options = MoEOptions(top_k=int(gate.top_k), activation=activation, score_func="sigmoid",
                             norm_topk_prob=bool(gate.norm_topk_prob), n_group=int(gate.num_group),
                             topk_group=int(gate.topk_group),
                             routed_scaling_factor=float(gate.routed_scaling_factor))
    options.check_num_experts(E)
    return options, routing


def apply(model: nn.Module) -> nn.Module:
    """Runs each sparse-MoE block of ``model`` as one fused FlashFuseMoE call (router + experts;
    shared experts on the model's own modules), in place. Returns ``model``.

    Blocks: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (softmax top-k, renormalised or not) and
    DeepSeek-V3 (sigmoid, selection bias, group-limited top-k, routed scaling). Routing and
    expert math follow the model's, with routing in fp32 (fp64 for fp64 states): where
    transformers computes it in another precision (router logits rounded to bf16 in bf16 models,
    fp32 routers in fp64 models) the weights agree to that precision. A DeepSeek-V3 router kept
    in fp32 beside bf16 states (``_keep_in_fp32_modules``), or any fp64 DeepSeek-V3 model, keeps the
    model's own fp32 router and runs only the experts fused, so routing decisions stay the model's.
    The router modules still fire their forward hooks with the logits our router computed (what
    ``output_router_logits`` records; their other two outputs are None). Parameters are not
    copied. ``restore(model)`` undoes it. Raises ``UnsupportedModelError`` for any other MoE block
    (nothing is changed then) and ``ValueError`` when the model has no MoE block.
    """
    blocks = [m for m in model.modules() if _is_moe_block(m)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse-MoE block (a module with an experts module)")
    unsupported = sorted({type(b).__name__ for b in blocks} - SUPPORTED_BLOCKS.keys())
    if unsupported:
        raise UnsupportedModelError(
            f"apply() supports the MoE blocks of {sorted(SUPPORTED_BLOCKS)}, not {unsupported}; "
            f"experts_implementation='{NAME}' may still run their experts"
        )
    plans = [_block_options(b) for b in blocks]  # all checked before any is changed
    for block, (options, routing) in zip(blocks, plans):
        block._flashfusemoe = (options, routing)
        block.gate.forward = _RouterReplay(block.gate)
        block.forward = _FusedForward(block)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undoes ``apply(model)``: the blocks and routers run their own forward again."""
    for m in model.modules():
        if _is_moe_block(m) and "_flashfusemoe" in m.__dict__:
            for obj in (m, m.gate):
                obj.__dict__.pop("forward", None)
            del m._flashfusemoe
    return model


class _RouterReplay:
    """A router's forward that returns a result handed to it (so the module call runs its hooks
    on our logits), or runs the router's own forward when called with none pending."""

    def __init__(self, router: nn.Module):
        self.router, self.pending = router, None

    def __call__(self, *args, **kwargs):
        if self.pending is None:
            return type(self.router).forward(self.router, *args, **kwargs)
        result, self.pending = self.pending, None
        return result


class _FusedForward:
    """A supported block's forward: the fused router + experts (+ the model's shared expert)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        block = self.block
        options, routing = block._flashfusemoe
        cls = type(block).__name__
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gate, experts = block.gate, block.experts
        jitter = getattr(block, "jitter_noise", 0.0)
        if block.training and jitter > 0:  # Mixtral: the jittered states feed router and experts
            x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
        if routing == "deepseek" and (gate.weight.dtype != x.dtype or x.dtype == torch.float64):
            # The model routes in fp32 with its fp32 router: keep its router, fuse the experts.
            _, weights, ids = gate(x)
            out = experts_forward(experts, x, ids, weights)
        else:
            out, outputs = moe_outputs(x, gate.weight, experts.gate_up_proj, experts.down_proj, options,
                                       expert_bias=getattr(gate, "e_score_correction_bias", None))
            # transformers' routers return logits in the states' dtype (DeepSeek-V3: fp32).
            logits_dtype = torch.float32 if routing == "deepseek" else x.dtype
            gate.forward.pending = (outputs.logits.to(logits_dtype), None, None)
            gate(x)
        shared = SUPPORTED_BLOCKS[cls][2]
        if shared == "gated":
            out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        elif shared == "plain":
            out = out + block.shared_experts(x)
        return out.reshape(shape)


register()
