"""``jax_bridge.fused_moe(..., ep_axis=...)`` inside ``shard_map`` on 4 forced host devices, against the
single-device layer on the gathered batch: out, the gradients of x, router, w_up and w_down (and the
shared expert's, through the NNX and Linen modules), the aux losses and counts.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX is imported, so the
cases run in one subprocess (this file as a script); the kernels run under the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

W, D, F, N = 4, 8, 6, 6  # N tokens per device


def test_ep_shard_map_matches_single_device():
    pytest.importorskip("jax")
    import torch
    from cpu_subprocess import with_xla_flags

    root = Path(__file__).resolve().parents[2]
    flags = with_xla_flags(os.environ, f"--xla_force_host_platform_device_count={W}")
    env = dict(os.environ, XLA_FLAGS=flags, TRITON_INTERPRET="1",
               JAX_PLATFORMS="cpu", FFMOE_EP_SEED=str(torch.initial_seed() % (1 << 30)),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
                            cwd=root)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "ALL PASSED" in result.stdout, result.stdout[-3000:]


# ---------------------------------------------------------------------------------------------
# The subprocess
# ---------------------------------------------------------------------------------------------


def _main() -> int:
    import zlib

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, for fast_interpreter
    import fast_interpreter
    import jax

    fast_interpreter.install()

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_bridge
    from jax_bridge import convert
    from jax_bridge.linen import FusedMoE as LinenMoE
    from jax_bridge.nnx import FusedMoE as NnxMoE

    assert len(jax.devices()) == W, jax.devices()
    seed = int(os.environ.get("FFMOE_EP_SEED", "0"))
    mesh = jax.make_mesh((W,), ("ep",))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    failures = []

    def check(name, got, want, dtype):
        tol = dict(rtol=1e-9, atol=1e-10) if dtype == jnp.float64 else dict(rtol=2e-4, atol=2e-5)
        try:
            np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), **tol)
        except AssertionError as e:
            failures.append(f"{name}: {e}")

    def bias_to(device: int, E: int):
        b = np.zeros(E, np.float32)
        b[device * (E // W):(device + 1) * (E // W)] = 100.0
        return jnp.asarray(b)

    def functional_case(name, E, K, dtype=jnp.float32, bias=None, expect_empty=None, expect_dropped=False,
                        identical_tokens=False, **kw):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        x = jnp.asarray(rng.standard_normal((W * N, D)), dtype)
        rw = jnp.asarray(rng.standard_normal((E, D)) * 0.7, dtype)
        if identical_tokens:  # every weight ties: capacity keeps the lowest tokens of the gathered batch.
            # Quarter-integer x and router weights make every logit exact, so the ties hold whatever
            # order a kernel sums in (the interpreter's dot rounds identical rows differently).
            x = jnp.broadcast_to(jnp.round(x[:1] * 4) / 4, x.shape)
            rw = jnp.round(rw * 4) / 4
        wu = jnp.asarray(rng.standard_normal((E, 2 * F, D)) / D**0.5, dtype)
        wd = jnp.asarray(rng.standard_normal((E, D, F)) / F**0.5, dtype)
        g = jnp.asarray(rng.standard_normal((W * N, D)), dtype)

        def loss(ep, x, rw, wu, wd, g):
            out, aux = jax_bridge.fused_moe(x, rw, wu, wd, K, expert_bias=bias, return_aux=True,
                                            ep_axis="ep" if ep else None, **kw)
            main = (out * g).sum()
            if ep:
                main = jax.lax.psum(main, "ep")
            total = main + 0.3 * aux["load_balance_loss"] + 0.7 * aux["z_loss"]
            return total, (out, aux)

        sharded = jax.shard_map(lambda *a: loss(True, *a), mesh=mesh,
                                in_specs=(P("ep"), P(), P("ep"), P("ep"), P("ep")),
                                out_specs=(P(), (P("ep"), P())))
        args = [put(x, P("ep")), put(rw, P()), put(wu, P("ep")), put(wd, P("ep")), put(g, P("ep"))]
        grad_fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3), has_aux=True))
        (val, (out, aux)), grads = grad_fn(*args)
        (rval, (rout, raux)), rgrads = jax.value_and_grad(
            lambda *a: loss(False, *a), argnums=(0, 1, 2, 3), has_aux=True)(x, rw, wu, wd, g)
        check(f"{name} loss", val, rval, dtype)
        check(f"{name} out", out, rout, dtype)
        for gname, a, b in zip(("x", "router_weight", "w_up", "w_down"), grads, rgrads):
            check(f"{name} grad {gname}", a, b, dtype)
        for key in ("load_balance_loss", "z_loss"):
            check(f"{name} {key}", aux[key], raux[key], dtype)
        tpe, rtpe = np.asarray(aux["tokens_per_expert"]), np.asarray(raux["tokens_per_expert"])
        if not np.array_equal(tpe, rtpe):
            failures.append(f"{name} tokens_per_expert {tpe} != {rtpe}")
        if int(aux["dropped_tokens"]) != int(raux["dropped_tokens"]):
            failures.append(f"{name} dropped {aux['dropped_tokens']} != {raux['dropped_tokens']}")
        if expect_dropped and int(raux["dropped_tokens"]) == 0:
            failures.append(f"{name}: capacity dropped nothing, the selection is untested")
        if expect_empty is not None:
            loads = np.asarray(raux["tokens_per_expert"]).reshape(W, -1).sum(1)
            if loads[expect_empty] != 0:
                failures.append(f"{name}: device {expect_empty} receives {loads[expect_empty]} rows")

    def module_case(kind: str):
        """NNX / Linen modules with a shared expert and expert bias, ep_axis against ep_axis=None.

        NNX: the module is built with all experts and its state split into the shard_map (w_up and
        w_down over "ep"). Linen: initialised without ep_axis, applied inside with it."""
        E, K = 8, 2
        kw = dict(num_shared_experts=1, shared_expert_gate=True, use_expert_bias=True)
        rng = np.random.default_rng(7 if kind == "nnx" else 8)
        x = jnp.asarray(rng.standard_normal((W * N, D)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((W * N, D)), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(E) * 0.1, jnp.float32)
        is_expert = lambda path: any(getattr(k, "key", None) in ("w_up", "w_down") for k in path)  # noqa: E731
        if kind == "nnx":
            graphdefs, state = {}, None
            for ep in (True, False):
                model = NnxMoE(D, F, E, K, rngs=nnx.Rngs(0), ep_axis="ep" if ep else None, **kw)
                model.expert_bias[...] = bias
                graphdefs[ep], state = nnx.split(model)

            def apply(params, x, ep):
                return nnx.merge(graphdefs[ep], params)(x, return_aux=True)
            params = state
        else:
            variables = LinenMoE(D, F, E, K, **kw).init(jax.random.key(0), x)
            params = {"params": variables["params"], convert.LINEN_BUFFERS: {"expert_bias": bias}}

            def apply(params, x, ep):
                module = LinenMoE(D, F, E, K, ep_axis="ep" if ep else None, **kw)
                return module.apply(params, x, return_aux=True)

        def loss(ep, p, x, g):
            out, aux = apply(p, x, ep)
            main = (out * g).sum()
            if ep:
                main = jax.lax.psum(main, "ep")
            return main + 0.3 * aux["load_balance_loss"] + 0.7 * aux["z_loss"], out

        specs = jax.tree_util.tree_map_with_path(lambda path, v: P("ep") if is_expert(path) else P(), params)
        p_sharded = jax.tree.map(put, params, specs)
        sharded = jax.shard_map(lambda p, x, g: loss(True, p, x, g), mesh=mesh,
                                in_specs=(specs, P("ep"), P("ep")), out_specs=(P(), P("ep")))
        (val, out), grads = jax.jit(jax.value_and_grad(sharded, has_aux=True))(
            p_sharded, put(x, P("ep")), put(g, P("ep")))
        ref_fn = jax.value_and_grad(lambda p, x, g: loss(False, p, x, g), has_aux=True)
        (rval, rout), rgrads = ref_fn(params, x, g)
        check(f"{kind} loss", val, rval, jnp.float32)
        check(f"{kind} out", out, rout, jnp.float32)
        leaves = jax.tree_util.tree_leaves_with_path(grads)
        rleaves = jax.tree_util.tree_leaves(rgrads)
        assert len(leaves) == len(rleaves) >= 6, (len(leaves), len(rleaves))
        for (path, a), b in zip(leaves, rleaves):
            check(f"{kind} grad {jax.tree_util.keystr(path)}", a, b, jnp.float32)

    def bad_inputs():
        x = jnp.zeros((W * N, D), jnp.float32)

        def expect(exc, text, E, E_local, axis="ep"):
            rw = jnp.zeros((E, D), jnp.float32)
            wu = jnp.zeros((E_local * W, 2 * F, D), jnp.float32)
            wd = jnp.zeros((E_local * W, D, F), jnp.float32)
            f = jax.shard_map(lambda x, rw, wu, wd: jax_bridge.fused_moe(x, rw, wu, wd, 1, ep_axis=axis),
                              mesh=mesh, in_specs=(P("ep"), P(), P("ep"), P("ep")), out_specs=P("ep"))
            try:
                f(put(x, P("ep")), put(rw, P()), put(wu, P("ep")), put(wd, P("ep")))
            except exc as e:
                if text not in str(e):
                    failures.append(f"bad input {text!r}: got {e}")
                return
            failures.append(f"bad input {text!r}: no error")

        expect(ValueError, "router_weight has E=6 experts, which the ep_axis of size W=4 cannot split", 6, 2)
        expect(ValueError, "w_up must hold this device's E/W=8/4=2 experts", 8, 1)
        expect(ValueError, "ep_axis='nope' is not a mesh axis", 8, 2, axis="nope")

    cases = [
        lambda: functional_case("top2", 8, 2),
        lambda: functional_case("top4 float64", 8, 4, dtype=jnp.float64),
        lambda: functional_case("sigmoid, bias, groups", 8, 3, bias=jnp.asarray(
            np.random.default_rng(3).standard_normal(8) * 0.1, jnp.float32), score_func="sigmoid", n_group=4,
            topk_group=2, routed_scaling_factor=2.5),
        lambda: functional_case("capacity", 8, 2, capacity_factor=0.75, expect_dropped=True),
        lambda: functional_case("capacity, identical tokens", 8, 2, capacity_factor=1.0, expect_dropped=True,
                                identical_tokens=True),
        lambda: functional_case("all to device 0, device 3 receives none", 8, 2, bias=bias_to(0, 8),
                                expect_empty=3),
        lambda: functional_case("capacity, all to device 0, top1", 8, 1, bias=bias_to(0, 8),
                                capacity_factor=1.0, expect_dropped=True),
        lambda: module_case("nnx"),
        lambda: module_case("linen"),
        bad_inputs,
    ]
    for case in cases:
        try:
            case()
        except Exception:
            failures.append(traceback.format_exc())
    if failures:
        print(f"data seed FFMOE_EP_SEED={seed}")
        print("\n".join(failures))
        return 1
    print("ALL PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
