"""FlashFuseMoE for JAX: the fused kernels behind ``jax.custom_vjp`` through XLA buffer callbacks.

``fused_moe`` takes the arguments of ``flashfusemoe.fused_moe`` on JAX arrays, ``moe_experts``
those of ``flashfusemoe.moe_experts``. Submodules:
``jax_bridge.reference`` (pure-JAX ground truth), ``jax_bridge.nnx`` and ``jax_bridge.linen``
(Flax modules), ``jax_bridge.compare`` (cross-framework comparison), ``jax_bridge.parallel``
(expert parallelism inside ``shard_map``: ``fused_moe(..., ep_axis=...)``).
"""

INSTALL_HINT = 'pip install "flashfusemoe[jax]"'


def missing_extra(error: ModuleNotFoundError) -> ModuleNotFoundError:
    """``error`` (jax, jaxlib, flax or optax not installed) restated with how to install them."""
    name = error.name or "jaxlib"  # jax raises "jax requires jaxlib" without a module name
    return ModuleNotFoundError(
        f"jax_bridge needs {name!r}, which is not installed: install the [jax] extra "
        f"({INSTALL_HINT}, or pip install -e \".[jax]\" in a checkout)",
        name=name,
    )


try:
    import jax  # noqa: F401
except ModuleNotFoundError as e:  # only jax or jaxlib missing; any other error is jax's own
    if e.name not in ("jax", "jaxlib") and not (e.name is None and "jaxlib" in str(e)):
        raise
    raise missing_extra(e) from e

from jax_bridge.experts import moe_experts  # noqa: E402
from jax_bridge.ops import aux_losses, fused_moe, update_expert_bias  # noqa: E402

__all__ = ["aux_losses", "fused_moe", "moe_experts", "update_expert_bias"]
