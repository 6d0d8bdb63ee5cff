"""transformers training-step benchmark: one step of config-built MoE models per experts implementation.

    python -m benchmarks.hf                          # both models, every implementation (one GPU)
    python -m benchmarks.hf --model qwen3-moe --impl grouped_mm flashfusemoe+apply
    python -m benchmarks.hf --tiny                   # 2-layer tiny models on CPU (smoke test)
    python -m benchmarks.hf --compile                # each decoder layer under torch.compile

A step is forward + backward + AdamW on bf16 parameters (``model.to(bfloat16)``: fp32 AdamW states
would not fit beside 5B parameters on one 80 GB card), causal-LM loss plus the router's
load-balancing loss (``output_router_logits``), 16384 tokens (8 sequences of 2048), synthetic
tokens, SDPA attention. Implementations: transformers' ``experts_implementation`` "eager",
"grouped_mm" and "batched_mm", ours ("flashfusemoe") and ours with
``flashfusemoe.integrations.transformers.apply(model)`` (router + experts fused). Each starts from
the same weights (same seed) and batches, so first-step losses agree. Reported: median step time
over the measured steps, tokens/s, peak allocated memory (``torch.cuda.max_memory_allocated``).
``--compile`` runs every implementation with each decoder layer under ``torch.compile`` (regional
compilation; the warm-up steps compile), so the model's own elementwise work (RMSNorm, RoPE, residuals)
is fused for all of them alike. ``--rounds 2`` runs the implementations again in the reverse order
(and so on, alternating) and reports per implementation the median over all rounds' measured steps
with each round's median beside it: the same GEMM can take 5-19% longer in one process than in the
next (docs/benchmarks.md, fifteenth session), so a ratio from one order alone carries that spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
import traceback
from pathlib import Path

import torch

from benchmarks.layer import environment, log, run_restoring_threads

IMPLS = ("eager", "grouped_mm", "batched_mm", "flashfusemoe", "flashfusemoe+apply")
BASELINE = "grouped_mm"

# name -> (config class, config kwargs). Vocabulary 32768 for both: the step measures the MoE, not a
# 150k-entry LM head.
MODELS = {
    "qwen3-moe": ("Qwen3MoeConfig", dict(
        hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=32768, max_position_embeddings=4096)),
    "mixtral": ("MixtralConfig", dict(
        hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32768,
        max_position_embeddings=4096)),
}
TINY = {
    "qwen3-moe": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, vocab_size=128),
    "mixtral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=128),
}
COMMON = dict(output_router_logits=True, router_aux_loss_coef=0.001, tie_word_embeddings=False,
              use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_model(name: str, impl: str, tiny: bool, device: str, dtype: torch.dtype, seed: int):
    import transformers

    from flashfusemoe.integrations import transformers as ffm

    config_cls, kwargs = MODELS[name]
    kwargs = {**kwargs, **(TINY[name] if tiny else {})}
    config = getattr(transformers, config_cls)(**kwargs, **COMMON)
    experts = "flashfusemoe" if impl.startswith("flashfusemoe") else impl
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                              experts_implementation=experts)
    model.train()
    if impl == "flashfusemoe+apply":
        ffm.apply(model)
    chosen = model.config._experts_implementation
    if chosen != experts:  # a benchmark row must time the implementation it names
        raise RuntimeError(f"transformers built the model with experts_implementation={chosen!r}, "
                           f"not {experts!r}")
    return model


def compile_layers(model) -> None:
    """Each decoder layer under ``torch.compile`` (in place). The layers share their code, so
    Dynamo compiles it once and reuses it for the others."""
    for layer in model.model.layers:
        layer.compile(dynamic=False)


def step_fn(model, opt, batch):
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def run_impl(name, impl, args, batches, cuda) -> dict:
    res = {"model": name, "impl": impl, "status": "ok", "note": ""}
    try:
        res.update(_run(name, impl, args, batches, cuda))
    except Exception as exc:  # noqa: BLE001
        oom = isinstance(exc, torch.OutOfMemoryError)
        res.update(status="OOM" if oom else "error", note=f"{type(exc).__name__}: {str(exc)[:300]}")
        if not oom:
            traceback.print_exc()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def _run(name, impl, args, batches, cuda) -> dict:
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(name, impl, args.tiny, device, dtype, args.seed)
    if args.compile:
        compile_layers(model)
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    losses, times = [], []
    for batch in batches:
        t0 = time.perf_counter()
        losses.append(step_fn(model, opt, batch))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    measured = times[args.warmup:]
    step_s = statistics.median(measured)
    tokens = batches[0].numel()
    return {
        "build_s": build_s,
        "losses": [float(v) for v in losses],
        "step_ms_p50": step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in measured],
        "tokens_per_s": tokens / step_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "params": sum(p.numel() for p in model.parameters()),
    }


def merge_rounds(results: list[dict]) -> list[dict]:
    """One row per (model, implementation) over its rounds, in first-seen order: the median of every
    round's measured steps, the largest peak, the first round's losses and each round's median
    (``round_p50``); a failed round makes the row that failure."""
    merged: dict[tuple, dict] = {}
    for r in results:
        key = (r["model"], r["impl"])
        m = merged.get(key)
        if m is None:
            merged[key] = m = {**r, "round_p50": []}
            if r["status"] == "ok":
                m["step_ms_all"] = []
        if m["status"] != "ok":
            continue
        if r["status"] != "ok":
            merged[key] = {**r, "round_p50": m["round_p50"]}
            continue
        m["step_ms_all"] = m["step_ms_all"] + r["step_ms_all"]
        m["round_p50"].append(r["step_ms_p50"])
        m["step_ms_p50"] = statistics.median(m["step_ms_all"])
        m["tokens_per_s"] = r["tokens_per_s"] * r["step_ms_p50"] / m["step_ms_p50"]
        if r["peak_gib"] is not None:
            m["peak_gib"] = max(m["peak_gib"], r["peak_gib"])
    return list(merged.values())


def markdown(results: list[dict]) -> str:
    results = merge_rounds(results)
    lines = ["| model | experts implementation | status | step ms (p50) | per round | tokens/s "
             "| vs grouped_mm | vs eager | peak GiB | first loss |", "|---" * 10 + "|"]
    for r in results:
        by_impl = {x["impl"]: x for x in results if x["model"] == r["model"] and x["status"] == "ok"}

        def ratio(base, r=r, by_impl=by_impl):
            b = by_impl.get(base)
            return f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b and r["status"] == "ok" else "-"

        if r["status"] == "ok":
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            rounds = " / ".join(f"{v:.1f}" for v in r["round_p50"])
            lines.append(f"| {r['model']} | {r['impl']} | ok | {r['step_ms_p50']:.1f} | {rounds} "
                         f"| {r['tokens_per_s']:,.0f} | {ratio(BASELINE)} | {ratio('eager')} | {peak} "
                         f"| {r['losses'][0]:.4f} |")
        else:
            lines.append(f"| {r['model']} | {r['impl']} | {r['status']} | - | - | - | - | - | - | - |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="transformers MoE training step per experts implementation.")
    ap.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--impl", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=5, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1,
                    help="passes over the implementations, every other one in reverse order")
    ap.add_argument("--tiny", action="store_true", help="tiny 2-layer models on CPU, float32 (smoke test)")
    ap.add_argument("--compile", action="store_true",
                    help="each decoder layer under torch.compile, every implementation (warm-up compiles)")
    ap.add_argument("--out", default="out/bench-hf")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 2, 1
    if not args.tiny and not torch.cuda.is_available():
        ap.error("needs a CUDA device (or --tiny)")
    return args


def main(argv=None) -> int:
    return run_restoring_threads(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)  # (--help needs no transformers)
    try:
        import transformers
    except ImportError as e:
        raise SystemExit(f"benchmarks.hf needs transformers: pip install 'flashfusemoe[hf]' ({e})") from None
    cuda = not args.tiny
    env = environment("cuda" if cuda else "cpu", "benchmarks.hf")
    env["transformers"] = transformers.__version__
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "hf" + ("-tiny" if args.tiny else "") + ("-compiled" if args.compile else "")
    log(f"transformers {transformers.__version__} on {env['device']}: {args.batch} x {args.seq} "
        f"tokens/step, warm-up {args.warmup}, measured {args.steps}"
        + (", decoder layers under torch.compile" if args.compile else ""))
    results = []
    for name in args.model:
        vocab = (TINY[name] if args.tiny else MODELS[name][1])["vocab_size"]
        device = "cuda" if cuda else "cpu"
        batches = [torch.randint(3, vocab, (args.batch, args.seq), generator=gen).to(device)
                   for _ in range(args.warmup + args.steps)]
        order = [(i, impl) for i in range(args.rounds)
                 for impl in (args.impl if i % 2 == 0 else args.impl[::-1])]
        for i, impl in order:
            log(f"\n{name} / {impl}" + (f" (round {i + 1})" if args.rounds > 1 else ""))
            r = {**run_impl(name, impl, args, batches, cuda), "round": i}
            results.append(r)
            if r["status"] == "ok":
                peak = f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
                log(f"  {r['step_ms_p50']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s{peak}, "
                    f"losses {[round(v, 4) for v in r['losses']]}")
            else:
                log(f"  {r['status']}: {r['note']}")
            table = markdown(results)
            (out / f"{stem}.json").write_text(json.dumps({"meta": {**env, **vars(args)}, "results": results},
                                                         indent=1))
            header = (f"Card: {env['device']}; torch {env['torch']}, triton {env['triton']}, transformers "
                      f"{env['transformers']}; {env['date_utc']}; git {env['git']}; decoder layers "
                      f"{'under torch.compile' if args.compile else 'eager'}\n\n"
                      f"Command: `{env['command']}`\n\n")
            (out / f"{stem}.md").write_text(header + table)
    log("\n" + markdown(results))
    log(f"wrote {out / stem}.json and .md")
    bad = [r for r in results if r["status"] == "error" or
           (r["status"] == "ok" and not all(math.isfinite(v) for v in r["losses"]))]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
