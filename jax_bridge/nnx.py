"""``FusedMoE``: ``flashfusemoe.MoELayer`` as a Flax NNX module, on the JAX bridge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

import flashfusemoe
import jax_bridge
from jax_bridge import missing_extra

try:
    from flax import nnx
except ModuleNotFoundError as e:
    if e.name != "flax":
        raise
    raise missing_extra(e) from e

from flashfusemoe.config import LayerConfig, signature_with_options
from jax_bridge.convert import (
    apply_layer,
    check_float_dtype,
    init_params,
    layer_kwargs_from_torch,
    torch_state_dict_to_jax,
)

__all__ = ["ExpertBias", "FusedMoE"]


class ExpertBias(nnx.Variable):
    """The selection-only routing bias ``[E]`` (fp32): state, not a trainable ``nnx.Param``."""


class FusedMoE(nnx.Module):
    """Top-k routed GLU experts (+ optional shared expert), the NNX twin of ``MoELayer``.

    Same hyperparameters as ``flashfusemoe.MoELayer``, plus ``param_dtype`` (storage) and
    ``dtype`` (compute; ``None`` promotes the input's and the parameters' dtypes). Parameters,
    with the torch names and layouts: ``router_weight [E, D]``, ``w_up [E, 2F, D]``,
    ``w_down [E, D, F]``; with shared experts ``shared_w_up [2Fs, D]``, ``shared_w_down [D, Fs]``
    and, with ``shared_expert_gate``, ``shared_gate_weight [1, D]``, all ``nnx.Param``
    initialised ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. ``use_expert_bias`` adds
    ``expert_bias``, an fp32 ``ExpertBias [E]`` of zeros (not trained; ``update_expert_bias`` moves
    it towards balanced loads).

    ``__call__(x, return_aux=False)``: ``x [..., D]`` -> ``out`` or ``(out, aux)``, ``aux`` as
    ``flashfusemoe.fused_moe``'s. ``ep_axis``: expert parallelism inside ``shard_map`` over that
    mesh axis (size W). The module is built with all E experts; shard its state into the
    ``shard_map`` with ``w_up``/``w_down`` split over ``ep_axis`` (``P(ep_axis)``) and the rest
    replicated, so the call sees this device's ``[E/W, ...]`` shards (``jax_bridge.parallel``).
    """

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, top_k: int, *,
                 use_expert_bias: bool = False, num_shared_experts: int = 0,
                 shared_ffn_dim: int | None = None, shared_expert_gate: bool = False,
                 param_dtype: DTypeLike = jnp.float32, dtype: DTypeLike | None = None,
                 ep_axis: str | None = None, rngs: nnx.Rngs, **options: Any):
        self.config = LayerConfig.from_kwargs(
            d_model, ffn_dim, num_experts, top_k, "FusedMoE", use_expert_bias=use_expert_bias,
            num_shared_experts=num_shared_experts, shared_ffn_dim=shared_ffn_dim,
            shared_expert_gate=shared_expert_gate, **options)
        check_float_dtype("param_dtype", param_dtype)
        check_float_dtype("dtype", dtype, allow_none=True)
        self.param_dtype, self.dtype, self.ep_axis = param_dtype, dtype, ep_axis
        params = init_params(rngs.params(), self.config, param_dtype)
        for name in ("router_weight", "w_up", "w_down", "shared_w_up", "shared_w_down", "shared_gate_weight"):
            setattr(self, name, nnx.Param(params[name]) if name in params else None)
        self.expert_bias = ExpertBias(params["expert_bias"]) if use_expert_bias else None

    __init__ = signature_with_options(__init__)

    @classmethod
    def from_torch(cls, layer: flashfusemoe.MoELayer, *, dtype: DTypeLike | None = None) -> FusedMoE:
        """The NNX twin of a torch ``MoELayer``: same hyperparameters, exact copies of its weights
        (``param_dtype`` is the layer's dtype), compute ``dtype`` as given."""
        if not isinstance(layer, flashfusemoe.MoELayer):
            raise TypeError(f"layer must be a flashfusemoe.MoELayer, got {type(layer).__name__}")
        params = torch_state_dict_to_jax(layer.state_dict())
        param_dtype = params["router_weight"].dtype
        module = cls(**layer_kwargs_from_torch(layer), param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0))
        module.load_params_dict(params)
        return module

    def params_dict(self) -> dict:
        """``{torch name: array}`` of the parameters and ``expert_bias`` this module has."""
        names = (*self.config.param_specs(), *(("expert_bias",) if self.config.use_expert_bias else ()))
        return {name: getattr(self, name)[...] for name in names}

    def load_params_dict(self, params: Mapping) -> None:
        """Sets every variable from ``{torch name: array}``, cast to the variable's dtype.

        The names must be exactly ``params_dict()``'s and the shapes must match.
        """
        current = self.params_dict()
        if set(params) != set(current):
            raise ValueError(f"expected entries {sorted(current)}, got {sorted(params)}")
        for name, value in params.items():
            if tuple(jnp.shape(value)) != current[name].shape:
                raise ValueError(f"{name} must have shape {current[name].shape}, got {jnp.shape(value)}")
            if jnp.iscomplexobj(value):  # the cast would drop the imaginary part
                raise TypeError(f"{name} must be real, got dtype {jnp.asarray(value).dtype}")
        for name, value in params.items():
            getattr(self, name)[...] = jnp.asarray(value, current[name].dtype)

    def update_expert_bias(self, tokens_per_expert: jax.Array, rate: float) -> None:
        """One step of aux-loss-free balancing on ``tokens_per_expert`` [E] (``aux["tokens_per_expert"]``
        of the calls since the last update, summed): ``jax_bridge.update_expert_bias`` in place."""
        if self.expert_bias is None:
            raise ValueError("update_expert_bias needs the module built with use_expert_bias=True")
        self.expert_bias[...] = jax_bridge.update_expert_bias(self.expert_bias[...], tokens_per_expert, rate)

    def __call__(self, x: jax.Array, return_aux: bool = False
                 ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        return apply_layer(self.params_dict(), x, self.config, dtype=self.dtype, return_aux=return_aux,
                           ep_axis=self.ep_axis)
