"""``FusedMoE``: ``flashfusemoe.MoELayer`` as a Flax Linen module, on the JAX bridge."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flashfusemoe.config import LayerConfig, layer_fields
from jax_bridge import missing_extra

try:
    import flax.linen as nn
except ModuleNotFoundError as e:
    if e.name != "flax":
        raise
    raise missing_extra(e) from e

from jax_bridge.convert import LINEN_BUFFERS, apply_layer, check_float_dtype, local_experts, uniform_init

__all__ = ["FusedMoE"]


class FusedMoE(nn.Module):
    """Top-k routed GLU experts (+ optional shared expert), the Linen twin of ``MoELayer``.

    Same hyperparameters as ``flashfusemoe.MoELayer``, plus ``param_dtype`` (storage) and
    ``dtype`` (compute; ``None`` promotes the input's and the parameters' dtypes). The
    ``"params"`` collection holds ``router_weight [E, D]``, ``w_up [E, 2F, D]``,
    ``w_down [E, D, F]`` and, with shared experts, ``shared_w_up [2Fs, D]``,
    ``shared_w_down [D, Fs]`` and (``shared_expert_gate``) ``shared_gate_weight [1, D]``, all
    initialised ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. ``use_expert_bias`` adds an fp32 zero
    ``expert_bias [E]`` in the non-trainable ``"buffers"`` collection.

    ``__call__(x, return_aux=False)``: ``x [..., D]`` -> ``out`` or ``(out, aux)``, ``aux`` as
    ``flashfusemoe.fused_moe``'s. ``ep_axis``: expert parallelism inside ``shard_map`` over that
    mesh axis (size W); ``w_up``/``w_down`` are then this device's ``[E/W, ...]`` shards
    (``jax_bridge.parallel``).
    """

    d_model: int
    ffn_dim: int
    num_experts: int
    top_k: int
    # The layer's keyword arguments (the shared expert, the expert bias and MoEOptions' fields),
    # declared from their one definition.
    for _name, _annotation, _default in layer_fields():
        __annotations__[_name] = _annotation
        locals()[_name] = _default
    del _name, _annotation, _default
    param_dtype: Any = jnp.float32
    dtype: Any = None
    ep_axis: str | None = None

    @property
    def config(self) -> LayerConfig:
        kwargs = {name: getattr(self, name) for name, _, _ in layer_fields()}
        return LayerConfig.from_kwargs(self.d_model, self.ffn_dim, self.num_experts, self.top_k, "FusedMoE",
                                       **kwargs)

    @nn.compact
    def __call__(self, x: jax.Array, return_aux: bool = False
                 ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        config = self.config
        check_float_dtype("param_dtype", self.param_dtype)
        check_float_dtype("dtype", self.dtype, allow_none=True)
        params = {
            name: self.param(name, uniform_init(fan_in), shape, self.param_dtype)
            for name, (shape, fan_in) in config.param_specs(local_experts(config, self.ep_axis)).items()
        }
        if config.use_expert_bias:
            bias = self.variable(LINEN_BUFFERS, "expert_bias", jnp.zeros, (self.num_experts,), jnp.float32)
            params["expert_bias"] = bias.value
        return apply_layer(params, x, config, dtype=self.dtype, return_aux=return_aux, ep_axis=self.ep_axis)
