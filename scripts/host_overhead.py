"""Where the host time of one fused MoE step goes: enqueue time vs GPU time, and a cProfile.

    PYTHONPATH=. python scripts/host_overhead.py [--shape N D F E K] [--gemm G]
    PYTHONPATH=. python scripts/host_overhead.py --stub     # no GPU needed
    PYTHONPATH=. python scripts/host_overhead.py --compare  # launch paths, one process
    PYTHONPATH=. python scripts/host_overhead.py --sample   # where a step's host time goes
    PYTHONPATH=. python scripts/host_overhead.py --floor    # autograd's own cost for our interface

On a GPU it prints the fwd+bwd time, the host's enqueue time per step and a profile. ``--stub``
runs the GPU path's Python on CPU instead: Triton's interpreter is selected (so every wrapper
takes its Triton branch) and ``FastLaunch`` runs its own repeat-launch path (key, cache lookup)
up to the compiled kernel's C launcher, which is a no-op, as are the CUDA device and stream
queries; so what is timed is the package's own host work (checks, allocations, autograd,
``FastLaunch``) without Triton's launcher and the kernels. Compare two
checkouts by running it in each, one after the other, on an otherwise idle machine.

``--compare`` times the three launch paths in one process, alternating: ``triton`` (Triton's own
dispatch), ``fast`` (``FastLaunch`` through Triton's Python launcher) and ``direct`` (``FastLaunch``
calling the C launcher itself); per path the host's enqueue time, the synced fwd+bwd per call
and the pipelined one (``do_bench``), then each kernel's host time per launch on each path.

``--floor`` times, beside the real step, an ``autograd.Function`` with the layer's interface (four
leaves in; output, logits and two integer tensors out, each allocated with ``torch.empty``; four
gradients back) that launches nothing: the host cost of autograd and allocation alone.
"""

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=5, default=None, metavar=("N", "D", "F", "E", "K"),
                        help="default: the seed shape 8192 1024 1536 8 2 (--stub: 64 32 32 8 2)")
    parser.add_argument("--gemm", default="grouped")
    parser.add_argument("--stub", action="store_true", help="CPU, kernel launches replaced by no-ops")
    parser.add_argument("--profile", type=int, default=25, help="cProfile rows to print (0: none)")
    parser.add_argument("--compare", action="store_true", help="the launch paths, alternating (GPU)")
    parser.add_argument("--sample", action="store_true", help="stack samples of 300 steps")
    parser.add_argument("--floor", action="store_true", help="an autograd.Function that launches nothing")
    args = parser.parse_args()
    if args.stub:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, at import
    import torch

    import flashfusemoe
    from flashfusemoe.kernels.launch import FastLaunch
    from flashfusemoe.profiling import median_ms

    direct_launches = None
    if args.stub:
        direct_launches = stub_launches(FastLaunch)
        torch.set_num_threads(1)
    N, D, F, E, K = args.shape or ((64, 32, 32, 8, 2) if args.stub else (8192, 1024, 1536, 8, 2))
    device, dtype = ("cpu", torch.float32) if args.stub else ("cuda", torch.bfloat16)
    mk = lambda *s, scale: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_(True)
    leaves = [mk(N, D, scale=1), mk(E, D, scale=D ** -0.5), mk(E, 2 * F, D, scale=D ** -0.5),
              mk(E, D, F, scale=F ** -0.5)]
    grad_out = torch.randn(N, D, device=device).to(dtype)

    def forward():
        return flashfusemoe.fused_moe(*leaves, K, gemm=args.gemm)

    def step():
        return torch.autograd.grad(forward(), leaves, grad_out)

    sync = (lambda: None) if args.stub else torch.cuda.synchronize
    if args.compare:
        compare_launch_paths(step, sync)
        return
    if args.sample:
        sample_stacks(step, sync)
        return
    if args.floor:
        empty_step = empty_function_step(leaves, grad_out, K)
        for name, fn in (("fused_moe fwd+bwd", step), ("launch-free autograd.Function fwd+bwd", empty_step)):
            for _ in range(5):
                fn()
            sync()
            print(f"host time per {name} call (median of 50): {_host_us(fn, sync, 50):.1f} us")
        return
    if not args.stub:
        print(f"fwd+bwd median: {median_ms(step, warmup=5, iters=20):.3f} ms")
    for name, fn in (("forward", forward), ("fwd+bwd", step)):
        for _ in range(5):
            fn()
        sync()
        host = []
        for _ in range(20 if not args.stub else 200):
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            sync()
        print(f"host time per {name} call (median of {len(host)}): {sorted(host)[len(host) // 2]:.1f} us")
    if direct_launches is not None:
        before = len(direct_launches)
        step()
        print(f"FastLaunch repeat launches per fwd+bwd (stubbed C launcher): {len(direct_launches) - before}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            step()
        sync()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


def sample_stacks(step, sync, steps: int = 300, top: int = 40) -> None:
    """Counts of the innermost frame and of the innermost package frame over ``steps`` steps."""
    import collections
    import sys
    import threading

    for _ in range(10):
        step()
    sync()
    leaf, ours, stop = collections.Counter(), collections.Counter(), threading.Event()

    def where(frame, sep):
        return f"{frame.f_code.co_filename.split(sep)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"

    def sample():
        me = threading.get_ident()
        while not stop.is_set():
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                leaf[where(frame, "/")] += 1
                while frame is not None and "flashfusemoe" not in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is not None:
                    ours[where(frame, "flashfusemoe/")] += 1
            time.sleep(0.00005)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.00002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    for _ in range(steps):
        step()
        sync()
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    sys.setswitchinterval(interval)
    total = sum(leaf.values())
    print(f"{steps} steps in {elapsed * 1e3:.0f} ms, {total} samples (waits included)")
    for title, counts in (("innermost frame", leaf), ("innermost flashfusemoe frame", ours)):
        print(f"-- {title}")
        for name, count in counts.most_common(top):
            print(f"{count:6d} {100 * count / max(total, 1):5.1f}%  {name}")


def stub_launches(fast_launch_cls) -> list:
    """``FastLaunch`` on CPU: its repeat-launch path runs; compiling and launching are no-ops.

    Returns the list that each stubbed C-launcher call appends its kernel's grid to."""
    import inspect
    import types

    import torch

    from flashfusemoe.kernels import launch

    torch._C._cuda_getDevice = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    launch._ensure_context = lambda device: None
    direct_launches = []
    launch._direct_launcher = lambda compiled, descs: (
        lambda grid, stream, args, trailing: direct_launches.append(grid))
    fake_compiled = types.SimpleNamespace(run=None, function=None, packed_metadata=None)

    class NoCompile:  # the kernel's parameters (name, default), no compile
        def __init__(self, fn):
            self.params = list(inspect.signature(fn.fn).parameters.values())

        def __getitem__(self, grid):
            return lambda *args, **kwargs: fake_compiled

    original_launch = fast_launch_cls.launch

    def launch_stubbed(self, grid, args, kwargs):
        if not isinstance(self.fn, NoCompile):
            self.fn = NoCompile(self.fn)
        return original_launch(self, grid, args, kwargs)

    fast_launch_cls.enabled = True
    fast_launch_cls.launch = launch_stubbed
    return direct_launches


def empty_function_step(leaves, grad_out, top_k: int):
    """fwd+bwd of an ``autograd.Function`` with the fused layer's inputs and outputs and no kernels."""
    import torch

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, router_weight, w_up, w_down):
            n, e = x.shape[0], router_weight.shape[0]
            out, logits = torch.empty_like(x), torch.empty(n, e, device=x.device, dtype=x.dtype)
            counts = torch.empty(e, device=x.device, dtype=torch.int32)
            dropped = torch.empty((), device=x.device, dtype=torch.int32)
            ids = torch.empty(n, top_k, device=x.device, dtype=torch.int32)
            ctx.save_for_backward(x, router_weight, w_up, w_down, logits, ids)
            ctx.mark_non_differentiable(counts, dropped)
            ctx.set_materialize_grads(False)
            return out, logits, counts, dropped

        @staticmethod
        def backward(ctx, grad_out, grad_logits, *unused):
            return tuple(torch.empty_like(t) for t in ctx.saved_tensors[:4])

    return lambda: torch.autograd.grad(Empty.apply(*leaves)[0], leaves, grad_out)


def _set_path(path: str) -> None:
    from flashfusemoe.kernels.launch import FastLaunch

    FastLaunch.enabled = path != "triton"
    FastLaunch.direct = path == "direct"


def _host_us(fn, sync, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        sync()
    return statistics.median(times)


def compare_launch_paths(step, sync, rounds: int = 5) -> None:
    """Host enqueue time, synced and pipelined fwd+bwd per launch path; then per kernel."""
    import torch
    import triton

    from flashfusemoe.kernels.launch import FastLaunch
    from flashfusemoe.profiling import median_ms

    paths = ("triton", "fast", "direct")
    rows = {p: {"host": [], "synced": [], "pipelined": []} for p in paths}
    for _ in range(rounds):
        for path in paths:
            _set_path(path)
            for _ in range(3):
                step()
            sync()
            rows[path]["host"].append(_host_us(step, sync, 20))
            rows[path]["synced"].append(median_ms(step, warmup=2, iters=20))
            rows[path]["pipelined"].append(triton.testing.do_bench(step, warmup=25, rep=200))
    print(f"fwd+bwd, median of {rounds} alternating rounds")
    print("| launch path | host enqueue us | synced ms | pipelined ms |\n|---|---|---|---|")
    for path in paths:
        r = {k: statistics.median(v) for k, v in rows[path].items()}
        print(f"| {path} | {r['host']:.0f} | {r['synced']:.3f} | {r['pipelined']:.3f} |")

    # Per kernel: record one step's launches, then time each again on one program (grid (1,)) so
    # the GPU keeps up and what is timed is the host's launch cost.
    launches = []
    original = FastLaunch.launch

    def record(self, grid, launch_args, kwargs):
        launches.append((self, launch_args, kwargs))
        return original(self, grid, launch_args, kwargs)

    _set_path("direct")
    FastLaunch.launch = record
    step()
    FastLaunch.launch = original
    sync()
    print("\nhost us per launch (grid (1,), median of 200)")
    print("| kernel | args | descriptors | " + " | ".join(paths) + " |\n|---|---|---|" + "---|" * len(paths))
    for kernel, launch_args, kwargs in launches:
        times = []
        for path in paths:
            _set_path(path)
            fn = functools.partial(kernel.launch, (1,), launch_args, kwargs)
            fn()
            times.append(_host_us(fn, lambda: None, 200))
            torch.cuda.synchronize()
        descs = sum(a.__class__.__name__ == "TensorDescriptor" for a in launch_args)
        print(f"| {kernel.fn.__name__} | {len(launch_args)} | {descs} | "
              + " | ".join(f"{t:.1f}" for t in times) + " |")
    _set_path("direct")


if __name__ == "__main__":
    main()
