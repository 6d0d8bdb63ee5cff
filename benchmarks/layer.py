"""Layer benchmark: FlashFuseMoE next to its baselines, forward and forward+backward, one process.

    python -m benchmarks.layer --shape all                # every shape, every implementation
    python -m benchmarks.layer --shape seed --skew        # one expert gets ~30% of the tokens
    python -m benchmarks.layer --impl ffmoe-grouped torch-grouped_mm --fwd-only
    python -m benchmarks.layer --tiny                      # CPU smoke run (automatic without CUDA)

Torch implementations run first for every shape, then the JAX bridge, then pure JAX (JAX's
allocator keeps what it grows, so it must not sit beside the torch runs). Results are rewritten
after every implementation, so a run cut short keeps what it measured. ``--tiny`` compiles with
the "eager" backend. Method and columns: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import flashfusemoe  # noqa: E402
from benchmarks.baselines import grouped_mm_moe  # noqa: E402
from flashfusemoe.profiling import count_cuda_kernels  # noqa: E402
from flashfusemoe.reference import moe_reference  # noqa: E402

# (N tokens, D model, F expert intermediate, E experts, K top-k)
SHAPES = {
    "seed": (8192, 1024, 1536, 8, 2),
    "mid": (16384, 2048, 1408, 64, 6),
    "sonic": (32768, 4096, 2048, 64, 4),
    "fine": (24576, 1536, 256, 128, 8),
    "mixtral": (16384, 4096, 14336, 8, 2),
}
TINY_NDF = (64, 32, 32)  # --tiny keeps each shape's E and K, shrinks N, D, F
TORCH_IMPLS = (
    "reference-eager",
    "reference-compiled",
    "torch-grouped_mm",
    "ffmoe-bmm-2x",
    "ffmoe-bmm-cal",
    "ffmoe-grouped",
    "ffmoe-gathered",
    "ffmoe-fused_dgrad",
    "ffmoe-auto",
    "ffmoe-graphed",
)
# The bridge's custom-call mechanism per implementation: None is the process default
# (``jax_bridge.callback.USE_FFI``: ``buffer_callback`` unless FLASHFUSEMOE_JAX_FFI=1), True
# ``jax_bridge.ffi``.
BRIDGE_FFI = {"jax-bridge": None, "jax-bridge-ffi": True}
JAX_IMPLS = (*BRIDGE_FFI, "jax-ragged_dot")
IMPLS = TORCH_IMPLS + JAX_IMPLS
DENSE = "dense-limit"
# By default the compiled reference runs only up to this many experts: its Python loop breaks the
# graph once per expert, so compiling it at E=64..128 takes minutes. Ask for it by name to force it.
COMPILED_REFERENCE_MAX_E = 16
SKEW_FRACTION = 0.3
MIB = 2.0**20


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One benchmark shape: ``n_sets`` rotated inputs x/grad_out [N, D] and one set of weights."""

    name: str
    N: int
    D: int
    F: int
    E: int
    K: int
    xs: list
    grads: list
    router_weight: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    routing: dict = field(default_factory=dict)

    def flops_fwd(self) -> int:
        """Useful forward FLOPs: expert GEMMs of the N*K routed assignments plus the router GEMM."""
        A = self.N * self.K
        return 2 * A * self.D * 2 * self.F + 2 * A * self.F * self.D + 2 * self.N * self.D * self.E

    def weights(self):
        return [self.router_weight, self.w_up, self.w_down]


def _topk_ids(x, router_weight, K):
    logits = x.float() @ router_weight.float().t()
    return torch.softmax(logits, -1).topk(K, dim=-1).indices


def _hot_fraction(x, router_weight, K, expert=0) -> float:
    return float((_topk_ids(x, router_weight, K) == expert).any(-1).float().mean())


def _skew_router(x, router_weight, K) -> float:
    """Scales router row 0 (bisection) until about ``SKEW_FRACTION`` of the tokens pick expert 0."""
    base = router_weight[0].clone()
    if _hot_fraction(x, router_weight, K) >= SKEW_FRACTION:
        return 1.0
    lo, hi = 1.0, 64.0
    for _ in range(24):
        mid = math.sqrt(lo * hi)
        router_weight[0] = base * mid
        if _hot_fraction(x, router_weight, K) < SKEW_FRACTION:
            lo = mid
        else:
            hi = mid
    router_weight[0] = base * hi
    return hi


def routing_stats(p: Problem) -> dict:
    """Per-expert load of the first input set: max/mean and the hottest expert's token fraction."""
    ids = _topk_ids(p.xs[0], p.router_weight, p.K)
    counts = torch.zeros(p.E, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
    hot = int(counts.argmax())
    return {
        "max_load": int(counts.max()),
        "mean_load": p.N * p.K / p.E,
        "max_over_mean": float(counts.max()) / (p.N * p.K / p.E),
        "hot_expert": hot,
        "hot_expert_token_fraction": float((ids == hot).any(-1).float().mean()),
        "empty_experts": int((counts == 0).sum()),
    }


def make_problem(name, shape, dtype, device, n_sets, skew, seed) -> Problem:
    """Random inputs (never zeros) at unit-variance scale; weights shared by all input sets."""
    N, D, F, E, K = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size, scale=1.0):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype).mul_(scale)

    xs = [rnd(N, D) for _ in range(n_sets)]
    grads = [rnd(N, D) for _ in range(n_sets)]
    router_weight = rnd(E, D, scale=D**-0.5)
    w_up = rnd(E, 2 * F, D, scale=D**-0.5)
    w_down = rnd(E, D, F, scale=F**-0.5)
    p = Problem(name, N, D, F, E, K, xs, grads, router_weight, w_up, w_down)
    if skew:
        with torch.no_grad():
            p.routing["skew_scale"] = _skew_router(xs[0], router_weight, K)
    p.routing.update(routing_stats(p))
    for t in (*xs, *p.weights()):
        t.requires_grad_(True)
    return p


# ---------------------------------------------------------------------------------------------
# Timing and measurement
# ---------------------------------------------------------------------------------------------


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_ms(run, n_sets, cfg, cuda: bool, block=None, wall: list | None = None) -> float:
    """Median ms of ``run(i)`` over rotated input sets, after warm-up.

    CUDA: events around each call (the host waits for each call, so launch overhead counts);
    ``wall`` (a list) then also gets the median wall-clock ms of the same calls, each up to the
    return of the event's wait. Otherwise (CPU, JAX): wall clock, with ``block(result)`` waiting
    for asynchronous results.
    """
    block = block or (lambda r: None)
    for i in range(cfg.warmup):
        block(run(i % n_sets))
    _sync(cuda)
    iters = cfg.iters
    if iters is None:
        t0 = time.perf_counter()
        block(run(0))
        _sync(cuda)
        estimate = time.perf_counter() - t0
        iters = int(min(cfg.max_iters, max(cfg.min_iters, cfg.budget_s / max(estimate, 1e-6))))
    times, walls = [], []
    for i in range(iters):
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i % n_sets)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            block(run(i % n_sets))
            times.append((time.perf_counter() - t0) * 1e3)
        walls.append((time.perf_counter() - t0) * 1e3)
    if wall is not None:
        wall.append(statistics.median(walls))
    return statistics.median(times)


def pipelined_ms(run, n_sets, wait, steps: int = 20, repeats: int = 5) -> float:
    """Wall-clock ms per call over ``steps`` back-to-back calls with one ``wait`` at the end.

    The host may run ahead of the device, as in training. The same clock for torch and JAX
    (``time_ms`` must use events for torch and wall clock around each JAX call); median of
    ``repeats``.
    """
    wait(run(0))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        last = None
        for i in range(steps):
            last = run(i % n_sets)
        wait(last)
        times.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(times)


def count_host_syncs(run) -> int:
    """Synchronizing CUDA operations torch reports during ``run()`` (sync debug mode "warn")."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # Only torch's per-operation report: the first use of the mode also warns that it is a
    # "prototype" that does not detect all "synchronizing operations", which is no sync.
    return sum("called a synchronizing cuda operation" in str(w.message).lower() for w in caught)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def new_result(p: Problem, impl: str) -> dict:
    return {
        "shape": p.name,
        "impl": impl,
        "status": "ok",
        "note": "",
        "fwd_ms": None,
        "fwdbwd_ms": None,
        "fwdbwd_wall_ms": None,
        "pipelined_ms": None,
        "fwd_tflops": None,
        "fwdbwd_tflops": None,
        "fwd_frac_dense": None,
        "fwdbwd_frac_dense": None,
        "saved_mib": None,
        "peak_mib": None,
        "launches_fwd": None,
        "launches_bwd": None,
        "host_syncs": None,
    }


def _fill_rates(res: dict, p: Problem) -> None:
    for mode, mult in (("fwd", 1), ("fwdbwd", 3)):
        ms = res[f"{mode}_ms"]
        if ms:
            res[f"{mode}_tflops"] = mult * p.flops_fwd() / (ms * 1e-3) / 1e12


def measure_dense(p: Problem, cfg, cuda: bool) -> dict:
    """The dense limit: the same GEMM FLOPs as plain matmuls on [N*K, ...] operands."""
    res = new_result(p, DENSE)
    N, D, F, E, A = p.N, p.D, p.F, p.E, p.N * p.K
    dt, dev = p.w_up.dtype, p.w_up.device
    try:
        ops = {}
        with torch.no_grad():
            t = {
                "x": torch.randn(N, D, dtype=dt, device=dev),
                "r": torch.randn(E, D, dtype=dt, device=dev),
                "gl": torch.randn(N, E, dtype=dt, device=dev),
                "xa": torch.randn(A, D, dtype=dt, device=dev),
                "up": torch.randn(2 * F, D, dtype=dt, device=dev),
                "a": torch.randn(A, F, dtype=dt, device=dev),
                "down": torch.randn(D, F, dtype=dt, device=dev),
                "dy": torch.randn(A, D, dtype=dt, device=dev),
                "dh": torch.randn(A, 2 * F, dtype=dt, device=dev),
            }
            fwd = [
                lambda: t["x"] @ t["r"].t(),  # router logits [N, E]
                lambda: t["xa"] @ t["up"].t(),  # up [A, 2F]
                lambda: t["a"] @ t["down"].t(),  # down [A, D]
            ]
            bwd = [
                lambda: t["gl"] @ t["r"],  # router dx [N, D]
                lambda: t["gl"].t() @ t["x"],  # router dW [E, D]
                lambda: t["dy"] @ t["down"],  # da [A, F]
                lambda: t["dy"].t() @ t["a"],  # dW_down [D, F]
                lambda: t["dh"] @ t["up"],  # dx [A, D]
                lambda: t["dh"].t() @ t["xa"],  # dW_up [2F, D]
            ]
            ops["fwd"] = lambda i: [f() for f in fwd]
            ops["fwdbwd"] = lambda i: [f() for f in fwd + bwd]
            for mode in ("fwd",) if cfg.fwd_only else ("fwd", "fwdbwd"):
                res[f"{mode}_ms"] = time_ms(ops[mode], 1, cfg, cuda)
            res["pipelined_ms"] = pipelined_ms(ops[mode], 1, lambda r: _sync(cuda), *cfg.pipelined)
    except Exception as exc:  # noqa: BLE001
        _record_failure(res, exc)
    _fill_rates(res, p)
    _free()
    return res


def _record_failure(res: dict, exc: BaseException) -> None:
    if _is_oom(exc):
        res["status"] = "OOM"
        res["note"] = (res["note"] + " " if res["note"] else "") + "out of memory"
    else:
        res["status"] = "error"
        res["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        traceback.print_exc()


def _set_recompile_limit(limit: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def build_torch_impl(impl: str, p: Problem, cfg):
    """``(fn(x, router_weight, w_up, w_down) -> out, note)`` for a torch implementation."""
    K = p.K
    if impl == "reference-eager":
        return (lambda x, r, u, d: moe_reference(x, r, u, d, K)), ""
    if impl == "reference-compiled":
        _set_recompile_limit(4 * p.E + 16)
        # dynamic=True: per-expert token counts change with every input set; one compile, no recompiles.
        fn = torch.compile(
            lambda x, r, u, d: moe_reference(x, r, u, d, K), backend=cfg.compile_backend, dynamic=True
        )
        return fn, f"torch.compile(backend={cfg.compile_backend}, dynamic=True)"
    if impl == "torch-grouped_mm":
        return (lambda x, r, u, d: grouped_mm_moe(x, r, u, d, K)), ""
    if impl == "ffmoe-bmm-2x":
        rows = flashfusemoe.MoEOptions(top_k=K).heuristic_max_tokens(p.N, p.E)
        note = f"max_tokens={rows} (2x mean); max load {p.routing['max_load']}"
        return (lambda x, r, u, d: flashfusemoe.fused_moe(x, r, u, d, K, gemm="bmm")), note
    if impl == "ffmoe-bmm-cal":
        rows = flashfusemoe.calibrate_max_tokens([x.detach() for x in p.xs], p.router_weight.detach(), K)
        note = f"max_tokens={rows} (calibrated, +10%)"
        return (
            lambda x, r, u, d: flashfusemoe.fused_moe(x, r, u, d, K, gemm="bmm", max_tokens_per_expert=rows)
        ), note
    if impl == "ffmoe-grouped":
        return (lambda x, r, u, d: flashfusemoe.fused_moe(x, r, u, d, K, gemm="grouped")), ""
    if impl in ("ffmoe-gathered", "ffmoe-fused_dgrad"):
        gemm = impl.removeprefix("ffmoe-")
        return (lambda x, r, u, d: flashfusemoe.fused_moe(x, r, u, d, K, gemm=gemm)), ""
    if impl == "ffmoe-auto":
        return (lambda x, r, u, d: flashfusemoe.fused_moe(x, r, u, d, K)), "gemm='auto'"
    if impl == "ffmoe-graphed":
        # The sample arguments become the graphs' inputs: a call copies x into its own (a clone of
        # the first input set, so the sets stay as they are; the weights keep their addresses) and
        # replays forward, then backward, as one graph each.
        sample_x = p.xs[0].detach().clone().requires_grad_(True)
        graphed = torch.cuda.make_graphed_callables(
            lambda x, r, u, d: flashfusemoe.fused_moe(x, r, u, d, K), (sample_x, *p.weights()))
        return graphed, "gemm='auto' under torch.cuda.make_graphed_callables"
    raise ValueError(f"unknown torch implementation {impl!r}")


def measure_torch(impl: str, p: Problem, cfg, cuda: bool) -> dict:
    """Times fwd and fwd+bwd of one torch implementation; on CUDA also memory, launches, syncs."""
    res = new_result(p, impl)
    weights = p.weights()
    try:
        fn, res["note"] = build_torch_impl(impl, p, cfg)
        fwd = lambda i: fn(p.xs[i], *weights)

        def fwdbwd(i):
            out = fn(p.xs[i], *weights)
            return torch.autograd.grad(out, [p.xs[i], *weights], p.grads[i])

        n = len(p.xs)
        for i in range(n):  # warm-up over every set: compilation, recompiles, autotuning
            fwd(i) if cfg.fwd_only else fwdbwd(i)
        wall = []
        res["fwd_ms"] = time_ms(fwd, n, cfg, cuda)
        if not cfg.fwd_only:
            res["fwdbwd_ms"] = time_ms(fwdbwd, n, cfg, cuda, wall=wall)
            res["fwdbwd_wall_ms"] = wall[0]
        res["pipelined_ms"] = pipelined_ms(fwd if cfg.fwd_only else fwdbwd, n, lambda r: _sync(cuda),
                                           *cfg.pipelined)
        if cuda:
            _measure_cuda_extras(res, fn, p, cfg)
    except Exception as exc:  # noqa: BLE001
        _record_failure(res, exc)
    _fill_rates(res, p)
    _free()
    return res


def _measure_cuda_extras(res: dict, fn, p: Problem, cfg) -> None:
    weights = p.weights()
    leaves = [p.xs[0], *weights]
    if res["impl"] == "ffmoe-graphed":  # its buffers live in the graphs' pool, allocated at capture
        _count_launches_and_syncs(res, fn, leaves, p, cfg)
        return
    # Saved for backward: what the autograd graph holds once the output itself is freed. The graph
    # is kept through a view's node: the Python object of a custom autograd.Function's node (what
    # out.grad_fn gives for the fused op) does not keep the graph alive, and its saved tensors go
    # with the last output.
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn(*leaves)
    node = out.view(out.shape).grad_fn
    del out
    torch.cuda.synchronize()
    res["saved_mib"] = (torch.cuda.memory_allocated() - before) / MIB
    del node
    _free()
    # Peak: extra memory of one fwd+bwd (or fwd) above the resident inputs, weights and grad_out.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn(*leaves)
    grads = None if cfg.fwd_only else torch.autograd.grad(out, leaves, p.grads[0])
    torch.cuda.synchronize()
    res["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / MIB
    del out, grads
    _free()
    _count_launches_and_syncs(res, fn, leaves, p, cfg)


def _count_launches_and_syncs(res: dict, fn, leaves: list, p: Problem, cfg) -> None:
    res["launches_fwd"] = count_cuda_kernels(lambda: fn(*leaves))
    if not cfg.fwd_only:
        out = fn(*leaves)
        res["launches_bwd"] = count_cuda_kernels(lambda: torch.autograd.grad(out, leaves, p.grads[0]))
        del out

    def one_step():
        o = fn(*leaves)
        if not cfg.fwd_only:
            torch.autograd.grad(o, leaves, p.grads[0])

    res["host_syncs"] = count_host_syncs(one_step)


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------


def import_jax():
    """``(jax, None)`` or ``(None, reason)``."""
    try:
        import jax
    except Exception as exc:  # noqa: BLE001
        return None, f"jax not importable: {exc}"
    return jax, None


def build_jax_impl(impl: str, K: int):
    """``(fn(x, router_weight, w_up, w_down) -> out, None)`` or ``(None, reason to skip)``."""
    if impl == "jax-ragged_dot":
        try:
            from jax_bridge.reference import ragged_dot_moe
        except Exception as exc:  # noqa: BLE001
            return None, f"jax_bridge.reference.ragged_dot_moe not importable: {exc}"
        return (lambda x, r, u, d: ragged_dot_moe(x, r, u, d, K)), None
    if impl in BRIDGE_FFI:
        try:
            from jax_bridge import callback
            from jax_bridge import fused_moe as jax_fused_moe
        except Exception as exc:  # noqa: BLE001
            return None, f"jax_bridge.fused_moe not importable: {exc}"
        use_ffi = callback.USE_FFI if BRIDGE_FFI[impl] is None else BRIDGE_FFI[impl]

        def bridge(x, r, u, d):  # the custom-call mechanism is chosen when jax.jit traces this
            default, callback.USE_FFI = callback.USE_FFI, use_ffi
            try:
                return jax_fused_moe(x, r, u, d, K)
            finally:
                callback.USE_FFI = default

        return bridge, None
    raise ValueError(f"unknown JAX implementation {impl!r}")


def _xla_call_bytes(jitted, *args) -> int | None:
    """Device bytes XLA allocates for one call of ``jitted`` beyond its arguments: the outputs and
    the temporary buffer that holds every intermediate (XLA's static buffer assignment), or None
    where the backend does not report it."""
    stats = jitted.lower(*args).compile().memory_analysis()
    if stats is None:
        return None
    return stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes


def measure_jax(impl: str, p: Problem, cfg, cuda: bool) -> dict:
    """jax.jit forward, and jax.jit of jax.vjp with the same cotangents (fwd+bwd); wall clock."""
    res = new_result(p, impl)
    jax, reason = import_jax()
    if jax is None:
        res.update(status="skipped", note=reason)
        return res
    if cuda and jax.default_backend() != "gpu":
        res.update(status="skipped", note=f"jax backend is {jax.default_backend()}, not gpu")
        return res
    fn, reason = build_jax_impl(impl, p.K)
    if fn is None:
        res.update(status="skipped", note=reason)
        return res
    res["note"] = "wall clock around block_until_ready"
    if impl in BRIDGE_FFI:
        from jax_bridge import callback

        res["note"] += f"; custom call: {callback.custom_call_name(BRIDGE_FFI[impl])}"
    try:
        _measure_jax(res, jax, fn, p, cfg, cuda)
    except Exception as exc:  # noqa: BLE001
        _record_failure(res, exc)
    _fill_rates(res, p)
    jax.clear_caches()
    _free()
    return res


def _measure_jax(res: dict, jax, fn, p: Problem, cfg, cuda: bool) -> None:
    import jax.numpy as jnp

    to_jax = lambda t: jnp.array(jax.dlpack.from_dlpack(t.detach().contiguous()), copy=True)
    xs = [to_jax(t) for t in p.xs]
    gs = [to_jax(t) for t in p.grads]
    ws = [to_jax(t) for t in p.weights()]

    def fb(x, r, u, d, g):
        out, vjp = jax.vjp(fn, x, r, u, d)
        return out, vjp(g)

    f_fwd, f_fb = jax.jit(fn), jax.jit(fb)
    run_fwd = lambda i: f_fwd(xs[i], *ws)
    run_fb = lambda i: f_fb(xs[i], *ws, gs[i])
    block = jax.block_until_ready
    n = len(xs)
    run_one = run_fwd if cfg.fwd_only else run_fb
    for i in range(n):
        block(run_one(i))
    # Peak: what one call needs above its resident arguments, as torch's figure is: XLA's outputs
    # and temporary buffer, plus what torch allocates inside the bridge's callbacks during that one
    # call. (JAX's high-water mark can't be reset: it would span every call of the run, the
    # pipelined ones in flight together included.)
    one_args = (xs[0], *ws) if cfg.fwd_only else (xs[0], *ws, gs[0])
    xla_bytes = _xla_call_bytes(f_fwd if cfg.fwd_only else f_fb, *one_args)
    torch_extra = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch_before = torch.cuda.memory_allocated()
        block(run_one(0))
        torch_extra = torch.cuda.max_memory_allocated() - torch_before
    if xla_bytes is not None:
        res["peak_mib"] = (xla_bytes + torch_extra) / MIB
    res["fwd_ms"] = time_ms(run_fwd, n, cfg, False, block)
    if not cfg.fwd_only:
        res["fwdbwd_ms"] = res["fwdbwd_wall_ms"] = time_ms(run_fb, n, cfg, False, block)
    res["pipelined_ms"] = pipelined_ms(run_one, n, block, *cfg.pipelined)
    res["saved_mib"] = _jax_saved_bytes(jax, fn, [xs[0], *ws]) / MIB
    if cuda and res["impl"].startswith("jax-bridge"):
        res["host_syncs"] = count_host_syncs(lambda: block(run_one(0)))


def _jax_saved_bytes(jax, fn, args) -> int:
    """Bytes of the vjp residuals of a jitted forward, leaving out copies of the inputs themselves."""
    import jax.numpy as jnp

    _, vjp_fn = jax.jit(lambda *a: jax.vjp(fn, *a))(*args)
    pointers = {a.unsafe_buffer_pointer() for a in args}
    seen, total = set(), 0
    for leaf in jax.tree.leaves(vjp_fn):
        if not isinstance(leaf, jax.Array) or leaf.unsafe_buffer_pointer() in seen:
            continue
        seen.add(leaf.unsafe_buffer_pointer())
        is_input = leaf.unsafe_buffer_pointer() in pointers or any(
            a.shape == leaf.shape and a.dtype == leaf.dtype and bool(jnp.array_equal(a, leaf)) for a in args
        )
        if not is_input:
            total += leaf.nbytes
    return total


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def progress_line(res: dict) -> str:
    if res["status"] != "ok":
        return f"  {res['impl']:<20} {res['status']}: {res['note']}"
    syncs = res["host_syncs"]
    sync = "-" if syncs is None else ("no" if syncs == 0 else f"YES ({syncs})")
    launches = f"{_fmt(res['launches_fwd'], 'd')}/{_fmt(res['launches_bwd'], 'd')}"
    return (
        f"  {res['impl']:<20} fwd {_fmt(res['fwd_ms'], '9.3f')} ms"
        f"  fwd+bwd {_fmt(res['fwdbwd_ms'], '9.3f')} ms (wall {_fmt(res['fwdbwd_wall_ms'], '.3f')})"
        f"  pipelined {_fmt(res['pipelined_ms'], '9.3f')} ms"
        f"  {_fmt(res['fwdbwd_tflops'] or res['fwd_tflops'], '7.1f')} TFLOP/s"
        f"  {_fmt(res['fwdbwd_frac_dense'] or res['fwd_frac_dense'], '5.2f')} of dense"
        f"  saved {_fmt(res['saved_mib'], '.0f')} MiB  peak {_fmt(res['peak_mib'], '.0f')} MiB"
        f"  launches {launches}  sync {sync}  ({res.get('bench_s', 0):.1f} s)"
        + (f"  [{res['note']}]" if res["note"] else "")
    )


def fill_relative(results: list[dict]) -> None:
    """Fraction of the dense limit and speed-ups against the baselines, per shape."""
    by_shape: dict[str, dict[str, dict]] = {}
    for r in results:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = r
    for rows in by_shape.values():
        dense, ref, gmm = rows.get(DENSE), rows.get("reference-eager"), rows.get("torch-grouped_mm")
        for r in rows.values():
            for mode in ("fwd", "fwdbwd"):
                ms = r[f"{mode}_ms"]
                if ms and dense and dense[f"{mode}_ms"]:
                    r[f"{mode}_frac_dense"] = dense[f"{mode}_ms"] / ms
                for base, key in ((ref, "speedup_vs_reference"), (gmm, "speedup_vs_grouped_mm")):
                    if ms and base and base[f"{mode}_ms"]:
                        r[f"{mode}_{key}"] = base[f"{mode}_ms"] / ms


def markdown_table(results: list[dict], fwd_only: bool) -> str:
    mode = "fwd" if fwd_only else "fwdbwd"
    head = (
        "| shape | impl | fwd ms | fwd+bwd ms | fwd+bwd wall ms | pipelined ms | TFLOP/s | of dense "
        "| vs ref-eager | vs grouped_mm | saved MiB | peak MiB | launches fwd/bwd | host sync | status |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in results:
        syncs = r["host_syncs"]
        sync = "-" if syncs is None else ("no" if syncs == 0 else f"yes ({syncs})")
        status = r["status"] + (f": {r['note']}" if r["note"] else "")
        lines.append(
            f"| {r['shape']} | {r['impl']} | {_fmt(r['fwd_ms'], '.3f')} | {_fmt(r['fwdbwd_ms'], '.3f')} "
            f"| {_fmt(r['fwdbwd_wall_ms'], '.3f')} | {_fmt(r['pipelined_ms'], '.3f')} "
            f"| {_fmt(r[f'{mode}_tflops'], '.1f')} | {_fmt(r[f'{mode}_frac_dense'], '.2f')} "
            f"| {_fmt(r.get(f'{mode}_speedup_vs_reference'), '.2f')} "
            f"| {_fmt(r.get(f'{mode}_speedup_vs_grouped_mm'), '.2f')} "
            f"| {_fmt(r['saved_mib'], '.0f')} | {_fmt(r['peak_mib'], '.0f')} "
            f"| {_fmt(r['launches_fwd'], 'd')}/{_fmt(r['launches_bwd'], 'd')} | {sync} | {status} |"
        )
    return "\n".join(lines)


def environment(device: str, module: str = "benchmarks.layer") -> dict:
    """Date, command line, versions, card and git commit, for the result files."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", module, *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "flashfusemoe": flashfusemoe.__version__,
    }
    for mod in ("triton", "jax"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:  # FLASHFUSEMOE_GIT: for copies of the tree whose .git is not the source's
        env["git"] = os.environ.get("FLASHFUSEMOE_GIT") or (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        env["git"] = None
    return env


def select_impls(requested: list[str], p_E: int, cuda: bool) -> list[tuple[str, str | None]]:
    """``[(impl, skip_reason or None)]`` in run order."""
    explicit = "all" not in requested
    chosen = IMPLS if not explicit else [i for i in IMPLS if i in requested]
    out = []
    for impl in chosen:
        skip = None
        if impl == "reference-compiled" and not explicit and p_E > COMPILED_REFERENCE_MAX_E:
            skip = (
                f"not run by default for E > {COMPILED_REFERENCE_MAX_E} (its loop breaks the graph per "
                "expert; compile takes minutes): pass --impl reference-compiled"
            )
        if impl == "ffmoe-graphed" and not cuda:
            skip = "CUDA graphs need a GPU"
        out.append((impl, skip))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="FlashFuseMoE layer benchmark against its baselines.")
    ap.add_argument("--shape", nargs="+", default=["seed"], choices=[*SHAPES, "all"])
    ap.add_argument("--impl", nargs="+", default=["all"], choices=[*IMPLS, "all"])
    ap.add_argument("--skew", action="store_true", help=f"~{SKEW_FRACTION:.0%}% of tokens pick expert 0")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32 on CPU (smoke test)")
    ap.add_argument("--out", default="out/bench-layer", help="folder for the JSON and markdown results")
    ap.add_argument("--sets", type=int, default=None, help="rotated input sets (default 3, tiny 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls before timing, at least 1 (default 3; 1 with --tiny)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default: fit --budget)")
    ap.add_argument("--min-iters", type=int, default=5)
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--budget", dest="budget_s", type=float, default=0.5, help="seconds per timing")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        # The first call compiles (jax.jit, torch.compile): a timing without warm-up measures that.
        ap.error(f"--warmup must be >= 1, got {args.warmup}")
    if not torch.cuda.is_available() and not args.tiny:
        log("no CUDA device: running --tiny (tiny shapes, float32 on CPU)")
        args.tiny = True
    if args.tiny:
        # One thread: tiny CPU ops are slower on a thread pool, badly so on a loaded machine.
        torch.set_num_threads(1)
        args.sets = args.sets or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.iters = args.iters or 1
        args.compile_backend = args.compile_backend or "eager"
    args.sets = args.sets or 3
    args.warmup = 3 if args.warmup is None else args.warmup
    args.pipelined = (2, 1) if args.tiny else (20, 5)  # (calls, repeats); --tiny is a smoke run
    args.compile_backend = args.compile_backend or "inductor"
    return args


def run_restoring_threads(main_fn, argv) -> int:
    """``main_fn(argv)``, then torch's thread count as it was (``--tiny`` lowers it)."""
    threads = torch.get_num_threads()
    try:
        return main_fn(argv)
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    return run_restoring_threads(_main, argv)


def _main(argv=None) -> int:
    cfg = parse_args(argv)
    cuda = not cfg.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    names = list(SHAPES) if "all" in cfg.shape else list(dict.fromkeys(cfg.shape))
    shapes = {n: (*TINY_NDF, *SHAPES[n][3:]) if cfg.tiny else SHAPES[n] for n in names}
    env = environment(device)
    log(
        f"layer benchmark on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
        f"jax {env['jax']}, {dtype}, {'skewed' if cfg.skew else 'random'} routing, "
        f"{'fwd' if cfg.fwd_only else 'fwd and fwd+bwd'}"
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "layer" + "".join(
        s for s, on in (("-skew", cfg.skew), ("-fwd", cfg.fwd_only), ("-tiny", cfg.tiny)) if on
    )
    results, routing, dense = [], {}, {}
    meta = {
        **env,
        "dtype": str(dtype),
        "skew": cfg.skew,
        "fwd_only": cfg.fwd_only,
        "tiny": cfg.tiny,
        "sets": cfg.sets,
        "shapes": routing,
    }

    def save() -> str:
        """Writes what has been measured so far (a run cut short still leaves its results)."""
        order = {n: i for i, n in enumerate(names)}
        impl_order = {n: i for i, n in enumerate((DENSE, *IMPLS))}
        results.sort(key=lambda r: (order[r["shape"]], impl_order[r["impl"]]))
        fill_relative(results)
        table = markdown_table(results, cfg.fwd_only)
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        header = (
            f"Card: {env['device']}; torch {env['torch']}, triton {env['triton']}, jax {env['jax']}; "
            f"{env['date_utc']}; git {env['git']}\n\nCommand: `{env['command']}`\n\n"
        )
        (out / f"{stem}.md").write_text(header + table + "\n")
        return table

    # Torch first; then the bridge for every shape, then pure JAX: JAX's allocator keeps what it
    # grows, so the phase that grows it most runs last.
    phases = (
        ("torch", TORCH_IMPLS),
        ("jax-bridge", tuple(BRIDGE_FFI)),
        ("jax-ragged_dot", ("jax-ragged_dot",)),
    )
    for phase, phase_impls in phases:
        for name, shape in shapes.items():
            todo = [(i, s) for i, s in select_impls(cfg.impl, shape[3], cuda) if i in phase_impls]
            if not todo and phase != "torch":
                continue
            try:
                p = make_problem(name, shape, dtype, device, cfg.sets, cfg.skew, cfg.seed)
            except torch.OutOfMemoryError:
                log(
                    f"\n[{name}] out of memory creating the inputs: "
                    f"{', '.join(i for i, _ in todo)} reported OOM"
                )
                stub = Problem(name, *shape, [], [], None, None, None)
                results.extend({**new_result(stub, i), "status": "OOM", "note": "inputs"} for i, _ in todo)
                _free()
                continue
            routing[name] = {"N": p.N, "D": p.D, "F": p.F, "E": p.E, "K": p.K, **p.routing}
            if phase == "torch":
                log(
                    f"\n[{name}] N={p.N} D={p.D} F={p.F} E={p.E} K={p.K}: "
                    f"max load {p.routing['max_over_mean']:.2f}x mean, hottest expert takes "
                    f"{p.routing['hot_expert_token_fraction']:.0%} of tokens, "
                    f"{p.flops_fwd() / 1e9:.1f} GFLOP fwd"
                )
                dense[name] = res = measure_dense(p, cfg, cuda)
                results.append(res)
                log(progress_line(res))
            else:
                log(f"\n[{name}] {phase}")
            for impl, skip in todo:
                if skip:
                    res = new_result(p, impl)
                    res.update(status="skipped", note=skip)
                else:
                    log(f"  {impl} ...")
                    measure = measure_torch if phase == "torch" else measure_jax
                    t0 = time.perf_counter()
                    res = measure(impl, p, cfg, cuda)
                    res["bench_s"] = time.perf_counter() - t0
                results.append(res)
                if name in dense:
                    fill_relative([dense[name], res])
                log(progress_line(res))
                save()
            del p
            _free()
            torch._dynamo.reset()

    log("\n" + save())
    log(f"\nwrote {out / stem}.json and .md")
    errors = [r for r in results if r["status"] == "error"]
    if errors:
        log(
            f"{len(errors)} implementation(s) failed: "
            + ", ".join(f"{r['shape']}/{r['impl']}" for r in errors)
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
