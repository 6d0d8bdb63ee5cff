"""Measurement helpers shared by the demo, the benchmarks and the GPU tests."""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict

import torch


def count_cuda_kernels(fn) -> int:
    """Kernels (and memset/memcpy operations) launched on the GPU by one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def profiled_times(prof, on_gpu: bool) -> tuple[dict[str, float], Counter]:
    """Per event name of a ``torch.profiler`` run: the summed time (us) and the count of its GPU
    kernels (``on_gpu``; CPU ops' device totals would count their kernels twice), else of its CPU
    ops' self time. Events of zero time are left out."""
    time_us, count = defaultdict(float), Counter()
    for event in prof.events():
        if on_gpu and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us() if on_gpu else event.self_cpu_time_total
        if us > 0:
            time_us[event.name] += us
            count[event.name] += 1
    return time_us, count


def median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_median_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median GPU time of ``fn`` replayed as a CUDA graph: device time without host overhead.

    ``fn`` must be capturable (no host sync); tensors it allocates are reused across replays.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, warmup=warmup, iters=iters)
