"""Expert-parallel benchmark: our EP layer, a torch-ops EP baseline and our single-GPU layer.

    torchrun --nproc-per-node G -m benchmarks.ep            # GPUs, NCCL
    torchrun --nproc-per-node 2 -m benchmarks.ep --tiny     # CPU smoke run (gloo, tiny shapes)

Each rank holds N = 8192 tokens of the seed model's width (D = 1024, F = 1536, bf16); E = 8*G
experts, 8 per rank; top-2, softmax routing. Implementations, all timed forward + backward of
``(out * g).sum()``:

- ``ffmoe-ep``: ``flashfusemoe.fused_moe(..., ep_group=WORLD)`` (dropless: one host sync);
- ``torch-ep``: torch ops as torchtitan composes them: softmax top-k (float32 logits, as ours, so
  that both pick the same experts), argsort dispatch,
  ``all_to_all_single`` of the counts (host sync) and the rows
  (``torch.distributed.nn.functional``: differentiable), ``torch._grouped_mm`` (bf16 on CUDA;
  a per-expert loop elsewhere), the reverse all-to-all and an ``index_add`` combine;
- ``ffmoe-local``: our single-GPU layer on one GPU's share: the rank's N tokens over its 8 local
  experts only (router [8, D]), no communication: the time EP would take if all-to-all were free
  and the load were even.

Columns: fwd+bwd ms (median over ranks of the per-rank median, max over ranks in brackets),
all-to-all ms (CUDA events around each all-to-all call in a separate pass, summed per step: what
the issuing stream waits, peers' skew included), tokens/s of the whole group (G*N / fwd+bwd) and
peak memory (max over ranks). Rank 0 prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

import flashfusemoe
from flashfusemoe import parallel
from flashfusemoe.profiling import median_ms

SEED_SHAPE = (8192, 1024, 1536, 8, 2)  # N per rank, D, F, experts per rank, K
TINY_SHAPE = (64, 32, 32, 2, 2)


class A2ATimer:
    """CUDA events around all-to-all calls (None: off)."""

    def __init__(self, cuda: bool):
        self.cuda, self.events, self.wall = cuda, [], 0.0

    def run(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn()
        self.wall += (time.perf_counter() - t0) * 1e3
        return out

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events)
        return self.wall


_TIMER: A2ATimer | None = None


def _timed(fn):
    return fn() if _TIMER is None else _TIMER.run(fn)


def torch_ep(x, router_weight, w_up, w_down, K: int, group):
    """Dropless EP MoE in torch ops (see the module docstring). Local experts w_up [El, 2F, D]."""
    W = dist.get_world_size(group)
    N, D = x.shape
    E, El = router_weight.shape[0], w_up.shape[0]
    Fh = w_up.shape[1] // 2
    # Router logits in float32, as ours: bf16 logits pick other experts for some tokens.
    scores = torch.softmax(x.float() @ router_weight.float().t(), dim=-1)
    topk_w, topk_ids = scores.topk(K, dim=-1)
    topk_w = topk_w / topk_w.sum(-1, keepdim=True)
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // K
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    recv_counts = torch.empty_like(counts)
    _timed(lambda: dist.all_to_all_single(recv_counts, counts, group=group))
    send = counts.view(W, El).sum(1).tolist()  # host sync
    recv_counts_l = recv_counts.view(W, El)
    recv = recv_counts_l.sum(1).tolist()
    xs = x.index_select(0, token)
    x_recv = _timed(lambda: dist_fn.all_to_all_single(xs.new_empty(sum(recv), D), xs, recv, send,
                                                      group=group))
    # Received rows are grouped (source, local expert): regroup by local expert.
    local_ids = torch.arange(El, device=x.device).repeat(W).repeat_interleave(recv_counts_l.reshape(-1))
    perm = local_ids.argsort(stable=True)
    xl = x_recv.index_select(0, perm)
    offs = recv_counts_l.sum(0).cumsum(0).to(torch.int32)
    if x.is_cuda and x.dtype == torch.bfloat16:
        h = torch._grouped_mm(xl, w_up.transpose(-2, -1), offs=offs)
        a = torch.nn.functional.silu(h[:, :Fh]) * h[:, Fh:]
        y = torch._grouped_mm(a, w_down.transpose(-2, -1), offs=offs)
    else:
        ends = offs.tolist()
        parts, start = [], 0
        for e, end in enumerate(ends):
            h = xl[start:end] @ w_up[e].t()
            parts.append((torch.nn.functional.silu(h[:, :Fh]) * h[:, Fh:]) @ w_down[e].t())
            start = end
        y = torch.cat(parts)
    y_recv = torch.empty_like(y).index_copy(0, perm, y)
    y_back = _timed(lambda: dist_fn.all_to_all_single(y_recv.new_empty(sum(send), D), y_recv, send, recv,
                                                      group=group))
    w_rows = topk_w.reshape(-1).index_select(0, order)
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    return out.index_add(0, token, y_back.float() * w_rows[:, None]).to(x.dtype)


def _install_ffmoe_timer():
    original = parallel._all_to_all

    def timed(*args, **kwargs):
        return _timed(lambda: original(*args, **kwargs))

    parallel._all_to_all = timed


def measure(name, step, cfg, cuda: bool, group) -> dict:
    global _TIMER
    for _ in range(cfg.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier(group)
    step_ms = median_ms(step, warmup=0, iters=cfg.iters)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    a2a = []
    for _ in range(max(1, cfg.iters // 2)):
        _TIMER = A2ATimer(cuda)
        step()
        a2a.append(_TIMER.total_ms())
        _TIMER = None
    mine = torch.tensor([step_ms, statistics.median(a2a), peak or 0.0], dtype=torch.float64)
    W = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather_object(gathered, mine, group=group)
    rows = torch.stack(gathered)
    return {
        "impl": name,
        "fwdbwd_ms": float(rows[:, 0].median()),
        "fwdbwd_ms_max": float(rows[:, 0].max()),
        "a2a_ms": float(rows[:, 1].median()) if name != "ffmoe-local" else 0.0,
        "peak_mib": float(rows[:, 2].max()) if cuda else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run; automatic without CUDA)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default 20, tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5, tiny 1)")
    ap.add_argument("--impl", nargs="+", default=["ffmoe-ep", "torch-ep", "ffmoe-local"])
    ap.add_argument("--out", default="out/bench-ep", help="folder for the JSON and markdown results")
    cfg = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not cfg.tiny
    cfg.tiny = cfg.tiny or not cuda
    cfg.iters = cfg.iters or (3 if cfg.tiny else 20)
    cfg.warmup = cfg.warmup or (1 if cfg.tiny else 5)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        run(cfg, cuda)
        # Free the run's reference cycles while the group is alive: a gloo group torn down in
        # interpreter shutdown can abort the process (seen under load).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def run(cfg, cuda: bool) -> None:
    """Times every ``cfg.impl`` on this rank; rank 0 prints and writes the table."""
    group = dist.group.WORLD
    rank, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    N, D, F, El, K = TINY_SHAPE if cfg.tiny else SEED_SHAPE
    E = El * W
    g = torch.Generator(device="cpu").manual_seed(1234)  # the same full weights on every rank
    router = (torch.randn(E, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
    w_up_full = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    w_down_full = torch.randn(E, D, F, generator=g) / F**0.5
    w_up = w_up_full[rank * El:(rank + 1) * El].to(device, dtype).requires_grad_()
    w_down = w_down_full[rank * El:(rank + 1) * El].to(device, dtype).requires_grad_()
    del w_up_full, w_down_full
    torch.manual_seed(rank)
    x = torch.randn(N, D, device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(N, D, device=device, dtype=dtype)
    router_local = router.detach()[rank * El:(rank + 1) * El].clone().requires_grad_()
    _install_ffmoe_timer()
    # torch.distributed.nn.functional is deprecated in favour of _functional_collectives, whose
    # autograd all-to-all is private API; the deprecated one is the stable differentiable op.
    warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated", category=FutureWarning)

    steps = {
        "ffmoe-ep": lambda: flashfusemoe.fused_moe(x, router, w_up, w_down, K, ep_group=group),
        "torch-ep": lambda: torch_ep(x, router, w_up, w_down, K, group),
        "ffmoe-local": lambda: flashfusemoe.fused_moe(x, router_local, w_up, w_down, K),
    }
    # The baseline computes the same function (up to routing-tie order and rounding).
    with torch.no_grad():
        ref = flashfusemoe.fused_moe(x, router, w_up, w_down, K, ep_group=group).float()
        diff = (torch_ep(x, router, w_up, w_down, K, group).float() - ref).abs().max() / ref.abs().max()
    results = []
    for name in cfg.impl:
        fn = steps[name]

        def step(fn=fn):
            for t in (x, router, w_up, w_down, router_local):
                t.grad = None
            fn().backward(grad)

        res = measure(name, step, cfg, cuda, group)
        res["tokens_per_s"] = W * N / (res["fwdbwd_ms"] / 1e3)
        results.append(res)
    if rank == 0:
        head = (f"G={W} ({'NCCL, ' + torch.cuda.get_device_name() if cuda else 'gloo, CPU'}), "
                f"N={N}/rank, D={D}, F={F}, E={E}, K={K}, {str(dtype).replace('torch.', '')}")
        lines = [head, "", "| impl | fwd+bwd ms (max) | all-to-all ms | tokens/s (group) | peak MiB |",
                 "|---|---|---|---|---|"]
        for r in results:
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {r['impl']} | {r['fwdbwd_ms']:.3f} ({r['fwdbwd_ms_max']:.3f}) "
                         f"| {r['a2a_ms']:.3f} | {r['tokens_per_s']:.3g} | {peak} |")
        lines.append(f"\ntorch-ep vs ffmoe-ep output, max |diff| / max |out| (rank 0): {float(diff):.2e}")
        table = "\n".join(lines)
        print(table)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"ep-G{W}{'-tiny' if cfg.tiny else ''}"
        meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "G": W, "N_per_rank": N, "D": D, "F": F, "E": E, "K": K, "dtype": str(dtype),
                "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                "torch_ep_max_rel_diff_rank0": float(diff)}
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
