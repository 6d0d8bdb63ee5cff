"""Training benchmark: the seed's model on one GPU, fused MoE layer against the unfused one.

    python -m benchmarks.train                       # unfused-eager, unfused-compiled, fused-compiled
    python -m benchmarks.train --impl fused-compiled --steps 50
    python -m benchmarks.train --tiny                # 2-layer model on CPU (automatic without CUDA)
    python -m benchmarks.train --framework jax       # the model in Flax NNX (benchmarks/train_jax.py)

Model (the seed's): d_model 1024, 16 heads, 24 layers, layer 0 a dense SwiGLU FFN of width
4*d_model, layers 1-23 MoE with 8 routed experts (intermediate 1536, top-2 softmax) + 1 shared
expert of the same width; RMSNorm, RoPE, SDPA causal attention, tied embeddings, vocab 50304.
About 0.49B active and 1.14B total parameters. Seq 1024, 8 sequences per step, AdamW, bf16
autocast, synthetic tokens. Every implementation starts from the same weights (one state_dict)
and sees the same batches, so the loss curves can be compared. Method: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import flashfusemoe
from benchmarks.layer import environment, log, run_restoring_threads
from flashfusemoe.config import GEMMS
from flashfusemoe.layer import init_uniform_
from flashfusemoe.reference import moe_reference

IMPLS = ("unfused-eager", "unfused-compiled", "fused-eager", "fused-compiled")
DEFAULT_IMPLS = ("unfused-eager", "unfused-compiled", "fused-compiled")
LOSS_TOL = 0.05


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 50304
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 24
    dense_ffn: int = 4096
    n_experts: int = 8
    top_k: int = 2
    expert_ffn: int = 1536
    seq: int = 1024
    batch: int = 8


TINY = ModelConfig(
    vocab=256,
    d_model=32,
    n_heads=2,
    n_layers=2,
    dense_ffn=64,
    n_experts=4,
    top_k=2,
    expert_ffn=32,
    seq=16,
    batch=2,
)


class UnfusedMoE(nn.Module):
    """``flashfusemoe.reference.moe_reference`` with ``MoELayer``'s parameters (same state_dict keys).

    Under autocast it casts inputs and weights to the autocast dtype and routes in fp32, exactly
    as ``MoELayer`` does, so both see the same numbers.
    """

    def __init__(self, d_model, ffn_dim, num_experts, top_k, num_shared_experts=1):
        super().__init__()
        self.top_k = top_k
        self.router_weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.w_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))
        shared = ffn_dim * num_shared_experts
        self.shared_w_up = nn.Parameter(torch.empty(2 * shared, d_model))
        self.shared_w_down = nn.Parameter(torch.empty(d_model, shared))
        for p, fan_in in (
            (self.router_weight, d_model),
            (self.w_up, d_model),
            (self.w_down, ffn_dim),
            (self.shared_w_up, d_model),
            (self.shared_w_down, shared),
        ):
            init_uniform_(p, fan_in)

    def forward(self, x, return_aux=False):
        dev = x.device.type
        tensors = [x, self.router_weight, self.w_up, self.w_down, self.shared_w_up, self.shared_w_down]
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            tensors = [t.to(dt) for t in tensors]
        x, r, u, d, su, sd = tensors
        with torch.autocast(dev, enabled=False):
            return moe_reference(
                x, r, u, d, self.top_k, shared_w_up=su, shared_w_down=sd, return_aux=return_aux
            )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


def rope(x, cos, sin):
    """Rotary embedding on [B, H, T, hd] with cos/sin [T, hd/2] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class DenseFFN(nn.Module):
    def __init__(self, d_model, width):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * width, bias=False)
        self.down = nn.Linear(width, d_model, bias=False)

    def forward(self, x, return_aux=False):
        gate, up = self.up(x).chunk(2, dim=-1)
        out = self.down(F.silu(gate) * up)
        return (out, None) if return_aux else out


class Block(nn.Module):
    """Pre-norm block; ``forward`` returns ``(x, load_balance_loss or 0)``."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-6), nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn, self.ffn = Attention(cfg), ffn

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        y, aux = self.ffn(self.norm2(x), return_aux=True)
        return x + y, (aux["load_balance_loss"] if aux is not None else x.new_zeros((), dtype=torch.float32))


class Head(nn.Module):
    """Final norm, tied unembedding and the cross-entropy loss (fp32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)

    def forward(self, x, embedding, targets):
        logits = F.linear(self.norm(x), embedding)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_factory):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        blocks = [Block(cfg, DenseFFN(cfg.d_model, cfg.dense_ffn))]
        blocks += [Block(cfg, moe_factory()) for _ in range(cfg.n_layers - 1)]
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(cfg)
        hd = cfg.d_model // cfg.n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.outer(torch.arange(cfg.seq, dtype=torch.float32), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for name, p in self.named_parameters():
            if name.startswith("embed") or name.endswith(
                ("qkv.weight", "proj.weight", "up.weight", "down.weight")
            ):
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        aux = 0.0
        for block in self.blocks:
            x, a = block(x, self.cos, self.sin)
            aux = aux + a
        return self.head(x, self.embed.weight, targets), aux / max(1, self.cfg.n_layers - 1)


def param_counts(model: Model) -> tuple[int, int]:
    """(total, active per token) parameters; tied embeddings counted once."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    inactive_per_layer = (cfg.n_experts - cfg.top_k) * 3 * cfg.d_model * cfg.expert_ffn
    return total, total - (cfg.n_layers - 1) * inactive_per_layer


def build_model(impl: str, cfg: ModelConfig, device, gemm: str = "auto") -> Model:
    """The seed model with the ``impl``'s MoE layers (``gemm``: the fused layers' ``gemm=``)."""
    if impl.startswith("fused"):
        factory = lambda: flashfusemoe.MoELayer(
            cfg.d_model, cfg.expert_ffn, cfg.n_experts, cfg.top_k, num_shared_experts=1, gemm=gemm
        )
    else:
        factory = lambda: UnfusedMoE(cfg.d_model, cfg.expert_ffn, cfg.n_experts, cfg.top_k)
    with torch.device(device):
        return Model(cfg, factory)


def initial_state(cfg: ModelConfig, seed: int, device) -> tuple[dict, tuple[int, int]]:
    """The initial weights every run starts from (a CPU ``state_dict``) and ``param_counts``."""
    torch.manual_seed(seed)
    init = build_model("unfused-eager", cfg, device)
    state = {k: v.detach().to("cpu", copy=True) for k, v in init.state_dict().items()}
    return state, param_counts(init)


def make_batches(cfg: ModelConfig, n: int, seed: int, device) -> list[torch.Tensor]:
    """Synthetic tokens [B, T+1]: Zipf-distributed unigrams (a curve that visibly falls in 50 steps)."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, cfg.vocab + 1, dtype=torch.float64) ** 1.1
    perm = torch.randperm(cfg.vocab, generator=gen)
    batches = []
    for _ in range(n):
        idx = torch.multinomial(probs, cfg.batch * (cfg.seq + 1), replacement=True, generator=gen)
        batches.append(perm[idx].view(cfg.batch, cfg.seq + 1).to(device))
    return batches


def compile_regions(model: Model, backend: str, mode: str | None = None) -> None:
    """Regional compilation: each block and the head separately (identical MoE blocks share code).
    ``mode``: torch.compile's (``"reduce-overhead"`` replays each region as a CUDA graph)."""
    kwargs = {"backend": backend}
    if mode is not None:
        kwargs["mode"] = mode
    for block in model.blocks:
        block.compile(**kwargs)
    model.head.compile(**kwargs)


def _set_recompile_limit(limit: int) -> None:
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def run_impl(impl, cfg, state, batches, n_steps, args, cuda) -> dict:
    """Trains ``n_steps`` from ``state``; returns losses, step times and peak memory (or the failure)."""
    res = {"impl": impl, "status": "ok", "note": "", "steps": n_steps}
    try:
        res.update(_train(impl, cfg, state, batches, n_steps, args, cuda))
        if not all(math.isfinite(v) for v in res["losses"]):
            res.update(status="error", note="non-finite loss")
    except Exception as exc:  # noqa: BLE001
        oom = isinstance(exc, torch.OutOfMemoryError)
        res.update(status="OOM" if oom else "error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
        if not oom:
            traceback.print_exc()
    gc.collect()  # the model and optimizer died with _train's frame
    if cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return res


def make_optimizer(model: Model, lr: float, cuda: bool) -> torch.optim.AdamW:
    """The benchmark's AdamW (betas 0.9/0.95, weight decay 0.1; fused on a GPU)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)


def train_step(model: Model, opt: torch.optim.Optimizer, batch: torch.Tensor, aux_coef: float,
               cuda: bool) -> torch.Tensor:
    """One step on ``batch`` [B, T+1] (bf16 autocast on a GPU): forward, backward, optimizer step.
    Returns the cross-entropy (without the load-balance term)."""
    device = "cuda" if cuda else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        ce, aux = model(batch[:, :-1], batch[:, 1:])
        loss = ce + aux_coef * aux
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ce


def _train(impl, cfg, state, batches, n_steps, args, cuda) -> dict:
    device = "cuda" if cuda else "cpu"
    out = {}
    compiled = impl.endswith("compiled")
    model = build_model(impl, cfg, device, args.gemm)
    model.load_state_dict(state)
    if compiled:
        _set_recompile_limit(64)
        mode = args.compile_mode
        compile_regions(model, args.compile_backend, mode)
        shown = f"backend={args.compile_backend}" + ("" if mode is None else f", mode={mode}")
        out["note"] = f"torch.compile({shown}), per block"
    opt = make_optimizer(model, args.lr, cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step in range(n_steps):
        batch = batches[step]
        t0 = time.perf_counter()
        if compiled:  # a new iteration for CUDA-graph trees (reduce-overhead): replays may reuse outputs
            torch.compiler.cudagraph_mark_step_begin()
        ce = train_step(model, opt, batch, args.aux_coef, cuda)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(ce.detach().clone())  # a CUDA-graph replay overwrites its outputs
        if step == 0 or (step + 1) % 10 == 0:
            log(f"    step {step + 1:3d}/{n_steps}  loss {float(ce.detach()):.4f}  {times[-1] * 1e3:8.1f} ms")
    measured = times[args.warmup :]
    out["losses"] = [float(v) for v in torch.stack(losses).tolist()]
    out["warmup_s"] = sum(times[: args.warmup])
    out["step_ms_p50"] = statistics.median(measured) * 1e3
    out["step_ms_all"] = [t * 1e3 for t in measured]
    out["tokens_per_s"] = cfg.batch * cfg.seq / statistics.median(measured)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return out


def loss_check(results: dict, n: int) -> dict:
    """Max |loss difference| over the first ``n`` steps of each fused run against unfused-eager.

    The yardstick of "bf16 noise": unfused-compiled against unfused-eager (same math, other
    kernels). A fused run passes when its difference is at most max(LOSS_TOL, 2 x yardstick).
    """
    base = results.get("unfused-eager")
    if not base or base["status"] != "ok":
        return {"note": "unfused-eager did not run: no loss-curve check"}
    k = min(n, len(base["losses"]))

    def diff(name):
        r = results.get(name)
        if not r or r["status"] != "ok":
            return None
        m = min(k, len(r["losses"]))
        return max(abs(a - b) for a, b in zip(r["losses"][:m], base["losses"][:m]))

    noise = diff("unfused-compiled")
    out = {
        "steps": k,
        "tolerance": max(LOSS_TOL, 2 * noise) if noise is not None else LOSS_TOL,
        "unfused-compiled_vs_unfused-eager": noise,
    }
    for name in ("fused-eager", "fused-compiled"):
        d = diff(name)
        if d is not None:
            out[f"{name}_vs_unfused-eager"] = d
            out[f"{name}_match"] = d <= out["tolerance"]
    return out


def results_table(results: dict) -> list[str]:
    """The markdown rows of the runs (step time, tokens/s, peak memory, warm-up, status)."""
    lines = [
        "| impl | p50 step ms | tokens/s | peak GiB | warm-up s | steps | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        f = lambda k, spec, r=r: format(r[k], spec) if r["status"] == "ok" and r.get(k) is not None else "-"
        lines.append(
            f"| {r['impl']} | {f('step_ms_p50', '.1f')} | {f('tokens_per_s', ',.0f')} | "
            f"{f('peak_gib', '.2f')} | {f('warmup_s', '.1f')} | {r['steps']} | "
            f"{r['status']}{': ' + r['note'] if r['note'] else ''} |"
        )
    return lines


def markdown(results: dict, check: dict, counts) -> str:
    lines = results_table(results)
    fused, eager, comp = (results.get(k) for k in ("fused-compiled", "unfused-eager", "unfused-compiled"))
    ratios = []
    if fused and fused["status"] == "ok":
        for base in (eager, comp):
            if base and base["status"] == "ok":
                ratios.append(
                    f"fused-compiled tokens/s = {fused['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                    f"{base['impl']}"
                )
        if eager and eager["status"] == "ok" and fused["peak_gib"]:
            ratios.append(
                f"fused-compiled peak memory = {fused['peak_gib'] / eager['peak_gib']:.2f}x unfused-eager"
            )
    text = "\n".join(lines)
    text += f"\n\nParameters: {counts[0]:,} total, {counts[1]:,} active per token.\n"
    if ratios:
        text += "\n" + "\n".join(f"- {r}" for r in ratios) + "\n"
    text += (
        "\nLoss curves: "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items())
        + "\n"
    )
    return text


def run_files(args, env: dict, cfg, counts, name: str) -> tuple[Path, str, dict]:
    """The output folder (created), the file stem and the metadata every training benchmark records."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**env, "model": cfg.__dict__, "params_total": counts[0], "params_active": counts[1],
            "warmup": args.warmup, "lr": args.lr, "aux_coef": args.aux_coef, "seed": args.seed}
    return out, name + ("-tiny" if args.tiny else ""), meta


def write_results(out: Path, stem: str, meta: dict, results: dict, check, table: str, env: dict,
                  libraries: tuple[str, ...]) -> None:
    """``<stem>.json`` (metadata, results, loss check) and ``<stem>.md`` (a header naming the card,
    the ``libraries``' versions, the date, the commit and the command; then ``table``)."""
    record = {"meta": meta, "results": results, "loss_check": check}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    versions = ", ".join(f"{lib} {env[lib]}" for lib in libraries)
    header = (f"Card: {env['device']}; {versions}; {env['date_utc']}; git {env['git']}\n\n"
              f"Command: `{env['command']}`\n\n")
    (out / f"{stem}.md").write_text(header + table)


def final_report(save, results: dict, out: Path, stem: str) -> int:
    """Writes the results (``save()``: the loss check and the table), prints the table, and returns
    the exit status: 1 if a run failed or a loss curve did not match, else 0."""
    check, table = save()
    log("\n" + table)
    log(f"wrote {out / stem}.json and .md")
    failed = [r["impl"] for r in results.values() if r["status"] == "error"]
    mismatch = [k for k, v in check.items() if k.endswith("_match") and not v]
    if failed or mismatch:
        log(f"FAILED: {failed + mismatch}")
    return 1 if failed or mismatch else 0


def add_run_args(ap: argparse.ArgumentParser, steps: int, compile_help: str) -> None:
    """The arguments the torch and the Flax training benchmarks share."""
    ap.add_argument("--layers", type=int, default=None, help="total layers (default 24)")
    ap.add_argument("--steps", type=int, default=steps, help="measured steps after warm-up (>= 20 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps, at least 1 (default 5)")
    ap.add_argument(
        "--check-steps",
        type=int,
        default=None,
        help="steps of the loss-curve comparison (default 50): every run trains "
        "max(warmup + steps, check-steps) steps",
    )
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balance loss coefficient")
    ap.add_argument("--compile-backend", default=None, help=compile_help)
    ap.add_argument(
        "--compile-mode",
        default=None,
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of every compiled run (reduce-overhead: CUDA graphs; default: none given)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gemm", default="auto", choices=GEMMS, help="torch fused layers' gemm= (default auto)")
    ap.add_argument("--tiny", action="store_true", help="2-layer tiny model on CPU (smoke test)")


def resolve_run_args(args, cuda: bool, no_cuda: str) -> None:
    """Fills in the defaults of ``add_run_args``' arguments: without ``cuda`` (logging ``no_cuda``)
    the run is ``--tiny``, which trains one step on one CPU thread."""
    if not cuda and not args.tiny:
        log(f"{no_cuda}: running --tiny (2-layer tiny model on CPU)")
        args.tiny = True
    if args.tiny:
        torch.set_num_threads(1)  # tiny CPU ops are slower on a thread pool
        args.steps = min(args.steps, 1)
        args.warmup = 1 if args.warmup is None else args.warmup
        args.check_steps = 2 if args.check_steps is None else args.check_steps
        args.compile_backend = args.compile_backend or "eager"
    args.warmup = 5 if args.warmup is None else args.warmup
    args.check_steps = 50 if args.check_steps is None else args.check_steps
    args.compile_backend = args.compile_backend or "inductor"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Seed-model training benchmark, fused vs unfused MoE.")
    ap.add_argument(
        "--impl",
        nargs="+",
        default=["all"],
        choices=[*IMPLS, "all"],
        help=f"'all' = {' '.join(DEFAULT_IMPLS)}",
    )
    add_run_args(ap, steps=30, compile_help="torch.compile backend (default inductor)")
    ap.add_argument("--out", default="out/bench-train")
    ap.add_argument(
        "--framework",
        choices=("torch", "jax"),
        default="torch",
        help="jax: the same model in Flax NNX (benchmarks.train_jax; see --framework jax --help)",
    )
    args = ap.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        ap.error(f"--warmup must be >= 1 (the first step compiles), got {args.warmup}")
    resolve_run_args(args, torch.cuda.is_available(), "no CUDA device")
    return args


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--framework", choices=("torch", "jax"), default="torch")
    known, rest = pre.parse_known_args(argv)
    if known.framework == "jax":
        from benchmarks import train_jax  # the Flax NNX model; its own flags

        return train_jax.main(rest)
    return run_restoring_threads(_main, rest)


def _main(argv=None) -> int:
    args = parse_args(argv)
    cuda = not args.tiny
    cfg = TINY if args.tiny else ModelConfig()
    if args.layers is not None:
        cfg = ModelConfig(**{**cfg.__dict__, "n_layers": args.layers})
    wanted = set(args.impl) | (set(DEFAULT_IMPLS) if "all" in args.impl else set())
    impls = [i for i in IMPLS if i in wanted]
    env = environment("cuda" if cuda else "cpu", "benchmarks.train")

    state, counts = initial_state(cfg, args.seed, "cuda" if cuda else "cpu")
    n_steps = max(args.warmup + args.steps, args.check_steps)
    batches = make_batches(cfg, n_steps, args.seed, "cuda" if cuda else "cpu")
    log(
        f"training benchmark on {env['device']}: {cfg}\n  {counts[0]:,} parameters, "
        f"{counts[1]:,} active; {cfg.batch * cfg.seq} tokens/step; warm-up {args.warmup}, "
        f"measured {args.steps}, loss check over {args.check_steps} steps"
    )

    out, stem, meta = run_files(args, env, cfg, counts, "train")
    results = {}

    def save():
        """Writes the runs finished so far (a run cut short still leaves its results)."""
        check = loss_check(results, args.check_steps)
        table = markdown(results, check, counts)
        write_results(out, stem, meta, results, check, table, env, ("torch", "triton"))
        return check, table

    for impl in impls:
        log(f"\n{impl}: {n_steps} steps")
        r = results[impl] = run_impl(impl, cfg, state, batches, n_steps, args, cuda)
        if r["status"] == "ok":
            peak = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
            log(
                f"  {impl}: p50 {r['step_ms_p50']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s{peak}, "
                f"warm-up {r['warmup_s']:.1f} s"
            )
        else:
            log(f"  {impl}: {r['status']}: {r['note']}")
        save()

    return final_report(save, results, out, stem)


if __name__ == "__main__":
    sys.exit(main())
