"""FlashFuseMoE for JAX: the fused kernels behind ``jax.custom_vjp`` through XLA buffer callbacks.

``fused_moe`` takes the arguments of ``flashfusemoe.fused_moe`` on JAX arrays, ``moe_experts``
those of ``flashfusemoe.moe_experts``. Submodules:
``jax_bridge.reference`` (pure-JAX ground truth), ``jax_bridge.nnx`` and ``jax_bridge.linen``
(Flax modules), ``jax_bridge.compare`` (cross-framework comparison), ``jax_bridge.parallel``
(expert parallelism inside ``shard_map``: ``fused_moe(..., ep_axis=...)``).
"""

from jax_bridge.experts import moe_experts
from jax_bridge.ops import aux_losses, fused_moe

__all__ = ["aux_losses", "fused_moe", "moe_experts"]
