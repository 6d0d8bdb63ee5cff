"""Where one synced call of the JAX bridge spends its time, against torch-native.

    PYTHONPATH=. python scripts/bridge_latency.py [--shape N D F E K] [--backward] [--ffi | --buffer-callback]

The bridge's callback is wrapped to stamp the host clock at its entry and exit and, on a GPU, to
record CUDA events on XLA's stream there. Per call (median, us):

    dispatch   call start -> callback entry (JAX dispatch and whatever XLA runs first)
    host       callback entry -> exit (DLPack views, checks, kernel launches)
    gpu        entry event -> exit event on XLA's stream (the kernels the callback enqueued; GPU only)
    after      callback exit -> ``block_until_ready`` returns (the GPU finishing, XLA's completion)
    total      call start -> return
    returned   call start -> the jitted call returns (GPU only, as are the next two)
    drained    call start -> the last callback's exit event has completed (polled from the host)
    ready      that event's completion -> ``block_until_ready`` returns (JAX's own completion)

then torch-native's same call by wall clock (call + synchronize) and by CUDA events.

``--floor`` measures instead what any synced call costs above its GPU work in each framework, with
no bridge involved: a chain of matmuls (``--floor-ms`` of GPU work each, on a GPU) as one
``jax.jit`` program and as torch calls, timed synced (call, wait, repeat) and pipelined (many
calls, one wait). Synced minus pipelined is the framework's fixed cost per synced call (dispatch,
the wait's wake-up); the bridge's per-call time cannot go below JAX's. The rows ``jax+bc`` and
``jax+ffi`` add one custom call after the chain (torch copies 8 rows on XLA's stream), through
``buffer_callback`` and through ``jax_bridge.ffi``: what each mechanism adds to a synced call.
``--ffi`` / ``--buffer-callback`` run the bridge itself on ``jax_bridge.ffi`` / ``buffer_callback``
(``callback.USE_FFI``; default: the process default, ``buffer_callback`` unless FLASHFUSEMOE_JAX_FFI=1).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import torch
from jax.experimental.buffer_callback import buffer_callback

import flashfusemoe
import jax_bridge
from jax_bridge import callback, ffi
from jax_bridge import ops as bridge_ops
from jax_bridge.callback import _as_torch, _TorchScope


def _median(values):
    return statistics.median(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=5, default=None, metavar=("N", "D", "F", "E", "K"),
                        help="default: the seed shape 8192 1024 1536 8 2 on a GPU, 64 32 32 8 2 on CPU")
    parser.add_argument("--backward", action="store_true", help="time fwd+bwd (jax.vjp) instead of forward")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--floor", action="store_true", help="each framework's fixed cost per synced call")
    parser.add_argument("--floor-ms", type=float, nargs="+", default=[1.5, 4.5],
                        help="GPU work per call for --floor (ms, approximate)")
    mechanism = parser.add_mutually_exclusive_group()
    mechanism.add_argument("--ffi", action="store_true",
                           help="run the bridge on its FFI custom call (jax_bridge.callback.USE_FFI)")
    mechanism.add_argument("--buffer-callback", action="store_true",
                           help="run the bridge on jax.experimental.buffer_callback")
    args = parser.parse_args()
    if args.ffi or args.buffer_callback:
        callback.USE_FFI = args.ffi
    cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
    if args.floor:
        return floor(args, cuda)
    N, D, F, E, K = args.shape or ((8192, 1024, 1536, 8, 2) if cuda else (64, 32, 32, 8, 2))
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"

    stamps = []  # per callback: (host entry, host exit, entry event, exit event)

    def stamped(callback):
        def wrapper(options, plan, ctx, *rest):
            events = None
            if cuda:
                stream = torch.cuda.ExternalStream(ctx.stream)
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record(stream)
            entry = time.perf_counter()
            callback(options, plan, ctx, *rest)
            leave = time.perf_counter()
            if cuda:
                events[1].record(stream)
            stamps.append((entry, leave, events))
        return wrapper

    bridge_ops._forward_callback = stamped(bridge_ops._forward_callback)
    bridge_ops._backward_callback = stamped(bridge_ops._backward_callback)

    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s, scale: (torch.randn(*s, device=device, generator=g) * scale).to(dtype)
    tensors = [mk(N, D, scale=1), mk(E, D, scale=D ** -0.5), mk(E, 2 * F, D, scale=D ** -0.5),
               mk(E, D, F, scale=F ** -0.5)]
    grad_out = mk(N, D, scale=1)
    to_jax = lambda t: jnp.array(jax.dlpack.from_dlpack(t.contiguous()), copy=True)
    arrays, g_jax = [to_jax(t) for t in tensors], to_jax(grad_out)

    layer = lambda *a: jax_bridge.fused_moe(*a, K)
    if args.backward:
        def fwd_bwd(x, r, u, d, g):
            out, vjp = jax.vjp(layer, x, r, u, d)
            return out, vjp(g)
        jitted = jax.jit(fwd_bwd)
        launch = lambda: jitted(*arrays, g_jax)
    else:
        jitted = jax.jit(layer)
        launch = lambda: jitted(*arrays)
    call = lambda: jax.block_until_ready(launch())

    for _ in range(10):
        stamps.clear()
        call()
    n_callbacks = len(stamps)
    rows = {k: [] for k in ("dispatch", "host", "gpu", "after", "total", "returned", "drained", "ready")}
    for i in range(args.iters):
        if cuda and i % 2:  # every other call: where the wait after the last kernel goes
            stamps.clear()
            start = time.perf_counter()
            result = launch()
            returned = time.perf_counter()
            while not (len(stamps) == n_callbacks and stamps[-1][2][1].query()):
                time.sleep(0)  # (lets a callback on another thread take the GIL)
            drained = time.perf_counter()
            jax.block_until_ready(result)
            end = time.perf_counter()
            rows["returned"].append((returned - start) * 1e6)
            rows["drained"].append((drained - start) * 1e6)
            rows["ready"].append((end - drained) * 1e6)
            continue
        stamps.clear()
        start = time.perf_counter()
        call()
        end = time.perf_counter()
        first, last = stamps[0], stamps[-1]
        rows["dispatch"].append((first[0] - start) * 1e6)
        rows["host"].append(sum(s[1] - s[0] for s in stamps) * 1e6)
        if cuda:
            rows["gpu"].append(sum(s[2][0].elapsed_time(s[2][1]) for s in stamps) * 1e3)
        rows["after"].append((end - last[1]) * 1e6)
        rows["total"].append((end - start) * 1e6)
    what = "fwd+bwd" if args.backward else "forward"
    print(f"bridge {what}, N={N} D={D} F={F} E={E} K={K} on {device} ({len(stamps)} callback(s) per call), "
          f"custom call {callback.custom_call_name()}, median us:")
    for name, values in rows.items():
        print(f"  {name:9s} {_median(values):9.1f}")

    leaves = [t.clone().requires_grad_(args.backward) for t in tensors]

    def torch_call():
        if args.backward:
            return torch.autograd.grad(flashfusemoe.fused_moe(*leaves, K), leaves, grad_out)
        with torch.no_grad():
            return flashfusemoe.fused_moe(*leaves, K)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(10):
        torch_call()
    sync()
    wall, events = [], []
    for _ in range(args.iters):
        start = time.perf_counter()
        torch_call()
        sync()
        wall.append((time.perf_counter() - start) * 1e6)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            torch_call()
            b.record()
            b.synchronize()
            events.append(a.elapsed_time(b) * 1e3)
    gpu_timing = f", CUDA events {_median(events):.1f} us" if cuda else ""
    print(f"torch {what}: wall clock {_median(wall):.1f} us{gpu_timing}")


def _copy_rows(ctx, out, y):
    with _TorchScope(ctx, y):
        _as_torch(out).copy_(_as_torch(y)[:8])


def floor(args, cuda: bool) -> None:
    """Synced and pipelined time per call of a matmul chain in JAX and in torch (see --floor)."""
    n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    x = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype) / n ** 0.5
    x_jax = jnp.array(jax.dlpack.from_dlpack(x), copy=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def per_call(call, wait, iters, pipelined):
        wait(call())
        start = time.perf_counter()
        if pipelined:
            for _ in range(iters):
                result = call()
            wait(result)
            return (time.perf_counter() - start) * 1e6 / iters
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            wait(call())
            times.append((time.perf_counter() - start) * 1e6)
        return _median(times)

    one = per_call(lambda: x @ x, lambda r: sync(), 20, True)  # one matmul's time
    print(f"matmul chains of {n}x{n} {str(dtype).removeprefix('torch.')} on {'GPU' if cuda else 'CPU'}; "
          f"per call, median us:")
    print(f"  {'framework':9s} {'matmuls':>7s} {'synced':>9s} {'pipelined':>9s} {'fixed':>7s}")
    for target_ms in args.floor_ms:
        reps = max(1, round(target_ms * 1e3 / one))
        def chain(a, reps=reps):
            return jax.lax.fori_loop(0, reps, lambda i, y: y @ a, a)

        jitted = jax.jit(chain)

        def torch_chain(reps=reps):
            y = x
            for _ in range(reps):
                y = y @ x
            return y

        # The same chain, then one custom call that copies 8 rows with torch on XLA's stream:
        # through buffer_callback (a host callback: JAX's Python dispatch) and through the FFI call.
        spec = jax.ShapeDtypeStruct((8, n), x_jax.dtype)
        rows = [("jax", lambda f=jitted: f(x_jax), jax.block_until_ready)]
        for name, custom in (("jax+bc", buffer_callback), ("jax+ffi", ffi.python_call)):
            copy = custom(_copy_rows, spec)
            f = jax.jit(lambda a, chain=chain, copy=copy: copy(chain(a)))
            rows.append((name, lambda f=f: f(x_jax), jax.block_until_ready))
        rows.append(("torch", torch_chain, lambda r: sync()))
        for name, call, wait in rows:
            synced = per_call(call, wait, args.iters, False)
            piped = per_call(call, wait, args.iters, True)
            print(f"  {name:9s} {reps:7d} {synced:9.1f} {piped:9.1f} {synced - piped:7.1f}")


if __name__ == "__main__":
    main()
