"""JAX expert parallelism inside shard_map: tokens sharded over "ep", experts sharded over "ep".

    python examples/ep_jax_shard_map.py      # CPU: 4 forced host devices (set below); GPUs: all visible

Gradients are those of the single-device layer on the gathered batch.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:  # added to the user's, before importing jax
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=4".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_bridge  # noqa: E402

D, F, K = 64, 128, 2


def main():
    W = len(jax.devices())
    mesh = jax.make_mesh((W,), ("ep",))
    E = 2 * W
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (W * 32, D))
    router = jax.random.normal(k[1], (E, D)) / D**0.5
    w_up = jax.random.normal(k[2], (E, 2 * F, D)) / D**0.5
    w_down = jax.random.normal(k[3], (E, D, F)) / F**0.5

    def loss(x, router, w_up, w_down):  # per device: its tokens, all routers, its E/W experts
        out, aux = jax_bridge.fused_moe(x, router, w_up, w_down, K, ep_axis="ep", return_aux=True)
        # aux losses are already the whole batch's (the same on every device): add them once
        return jax.lax.psum(jnp.square(out).sum(), "ep") / (W * 32) + 0.01 * aux["load_balance_loss"]

    specs = (P("ep"), P(), P("ep"), P("ep"))
    step = jax.jit(jax.value_and_grad(jax.shard_map(loss, mesh=mesh, in_specs=specs, out_specs=P()),
                                      argnums=(1, 2, 3)))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, router, w_up, w_down), specs)]
    value, grads = step(*args)
    print(f"{W} devices, loss {float(value):.5f}, grads {[g.shape for g in grads]}")
    return float(value)


if __name__ == "__main__":
    main()
