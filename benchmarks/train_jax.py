"""Flax NNX training benchmark: the seed model of ``benchmarks.train`` in JAX, two MoE layers.

    python -m benchmarks.train --framework jax                          # jax-bridge, jax-ragged_dot
    python -m benchmarks.train --framework jax --moe bridge --compare-torch   # + torch, loss curves
    python -m benchmarks.train --framework jax --tiny [--compare-torch]       # CPU smoke test

Model: ``benchmarks.flax_model.SeedModel``, the torch benchmark's model and sizes, with
``jax_bridge.nnx.FusedMoE`` (``jax-bridge``) or the pure-JAX ``lax.ragged_dot`` MoE
(``jax-ragged_dot``); MoE blocks under ``nnx.scan`` (``--no-scan``: a Python loop), optionally
``nnx.remat`` (``--remat``). Every run starts from the torch benchmark's initial weights (its
``state_dict``, converted exactly), sees its batches and uses its optimizer settings (AdamW lr
3e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on every parameter; load-balance coefficient
0.01). Compute is bf16 over fp32 weights on GPU, fp32 on ``--tiny`` (CPU), as torch's autocast.

One ``jax.jit`` train step (weights and AdamW state donated), each step timed by wall clock to
``block_until_ready``. Peak memory: JAX's ``peak_bytes_in_use`` on the device plus torch's
``max_memory_allocated`` during the run (the bridge's kernels allocate their scratch through
torch). JAX cannot reset its high-water mark: a later run in the same process whose peak stays
below an earlier run's reports that earlier peak, marked as an upper bound.

``--compare-torch`` first trains the torch model of ``benchmarks.train`` (``--torch-impl``,
default fused-compiled) on the same weights and batches, then prints both loss curves and
the max |cross-entropy difference| over ``--check-steps`` steps (pass: at most 0.05, the torch
benchmark's bf16-noise bound). Writes ``OUT/train-jax[-tiny].json`` and ``.md``.
"""

from __future__ import annotations

import os

# torch (the bridge's kernels, the compared torch model) and JAX share the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import train  # noqa: E402
from benchmarks.flax_model import MOE_LAYERS, SeedModel, load_torch_state_dict, param_count  # noqa: E402
from benchmarks.layer import environment, log  # noqa: E402

TORCH_IMPLS = ("fused-compiled", "fused-eager")
ROOT = Path(__file__).resolve().parents[1]
LOSS_TOL = train.LOSS_TOL


def impl_name(moe: str) -> str:
    return f"jax-{moe}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.train --framework jax",
        description="Seed-model training benchmark in Flax NNX: the fused MoE through the JAX bridge "
        "against a pure-JAX ragged_dot MoE (and, with --compare-torch, the torch fused model).",
    )
    ap.add_argument(
        "--moe",
        nargs="+",
        default=["all"],
        choices=[*MOE_LAYERS, "all"],
        help="MoE layers to run ('all' = bridge ragged_dot)",
    )
    ap.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="MoE blocks under nnx.scan (--no-scan: a Python loop)",
    )
    ap.add_argument(
        "--remat", action=argparse.BooleanOptionalAction, default=False, help="nnx.remat around every block"
    )
    ap.add_argument(
        "--attention",
        choices=("auto", "xla", "cudnn"),
        default="auto",
        help="jax.nn.dot_product_attention implementation (auto: cudnn on GPU when it runs)",
    )
    ap.add_argument(
        "--compare-torch",
        action="store_true",
        help="also train the torch model of benchmarks.train and compare the loss curves",
    )
    ap.add_argument(
        "--torch-impl", choices=TORCH_IMPLS, default="fused-compiled", help="the torch run of --compare-torch"
    )
    train.add_run_args(ap, steps=20, compile_help="torch.compile backend of --torch-impl fused-compiled")
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each run in its own process, so that each peak memory is its own (default: on GPU)",
    )
    ap.add_argument("--out", default="out/bench-train")
    ap.add_argument("--child-run", default=None, help=argparse.SUPPRESS)  # one run, for --isolate
    args = ap.parse_args(argv)
    for name, low in (("steps", 1), ("warmup", 0), ("check_steps", 1), ("layers", 2)):
        v = getattr(args, name)
        if v is not None and v < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    train.resolve_run_args(args, _cuda(), "no CUDA device for both torch and JAX")
    return args


def _cuda() -> bool:
    return torch.cuda.is_available() and jax.default_backend() == "gpu"


def resolve_attention(choice: str, cuda: bool, dtype) -> tuple[str, str]:
    """``(implementation, note)``: ``auto`` is cuDNN's fused attention where it runs forward and
    backward (GPU, 16-bit), else XLA's."""
    if choice != "auto":
        return choice, ""
    if not cuda or jnp.dtype(dtype).itemsize != 2:
        return "xla", ""
    try:
        q = jnp.ones((1, 256, 2, 64), dtype)
        attn = lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
        jax.block_until_ready(jax.jit(jax.grad(lambda q: attn(q).astype(jnp.float32).sum()))(q))
        return "cudnn", ""
    except Exception as exc:  # noqa: BLE001
        return "xla", f"cuDNN attention failed ({type(exc).__name__}: {str(exc)[:120]}); XLA's"


def make_train_step(graphdef, aux_coef: float):
    """``step(state, batch [B, T+1]) -> (state, cross-entropy)``; ``state`` = (model, optimizer) state."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            ce, balance = model(batch[:, :-1], batch[:, 1:])
            return ce + aux_coef * balance, ce

        (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), ce

    return step


def _memory_stats(cuda: bool):
    """JAX's (bytes in use, peak bytes in use) on the GPU; (None, None) on CPU."""
    stats = (jax.devices()[0].memory_stats() if cuda else None) or {}
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def run_jax(moe: str, cfg, state, batches, n_steps, args, cuda) -> dict:
    """Trains ``n_steps`` from the torch ``state``: losses, step times, peak memory (or the failure)."""
    res = {"impl": impl_name(moe), "status": "ok", "note": "", "steps": n_steps}
    try:
        res.update(_train(moe, cfg, state, batches, n_steps, args, cuda))
        if not all(math.isfinite(v) for v in res["losses"]):
            res.update(status="error", note="non-finite loss")
    except Exception as exc:  # noqa: BLE001
        oom = "RESOURCE_EXHAUSTED" in str(exc) or isinstance(exc, torch.OutOfMemoryError)
        res.update(status="OOM" if oom else "error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
        if not oom:
            traceback.print_exc()
    gc.collect()
    jax.clear_caches()
    if cuda:
        torch.cuda.empty_cache()
    return res


def build_training(moe: str, cfg, state, args, dtype):
    """``(step, train_state)``: the Flax model with MoE layer ``moe`` loaded from the torch
    ``state_dict``, optax AdamW, and the jitted train step (``make_train_step``). ``args``: this
    benchmark's (scan, remat, attention_impl, seed, lr, aux_coef)."""
    model = SeedModel(
        cfg,
        moe,
        scan=args.scan,
        remat=args.remat,
        dtype=dtype,
        attention=args.attention_impl,
        rngs=nnx.Rngs(args.seed),
    )
    load_torch_state_dict(model, state)
    n_params = param_count(model)
    if n_params != sum(v.numel() for v in state.values()):
        raise RuntimeError(
            f"the Flax model has {n_params:,} parameters, the torch state_dict "
            f"{sum(v.numel() for v in state.values()):,}"
        )
    tx = optax.adamw(args.lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    graphdef, st = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    return make_train_step(graphdef, args.aux_coef), st


def _train(moe, cfg, state, batches, n_steps, args, cuda) -> dict:
    dtype = jnp.bfloat16 if cuda else jnp.float32
    step_fn, st = build_training(moe, cfg, state, args, dtype)
    out = {
        "note": f"{'nnx.scan' if args.scan else 'loop'}{', remat' if args.remat else ''}, "
        f"{args.attention_impl} attention"
    }
    jax.block_until_ready(st)
    _, peak0 = _memory_stats(cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step in range(n_steps):
        t0 = time.perf_counter()
        st, ce = step_fn(st, batches[step])
        jax.block_until_ready((st, ce))
        times.append(time.perf_counter() - t0)
        losses.append(ce)
        if step == 0 or (step + 1) % 10 == 0:
            log(f"    step {step + 1:3d}/{n_steps}  loss {float(ce):.4f}  {times[-1] * 1e3:8.1f} ms")
    measured = times[args.warmup :]
    out["losses"] = [float(v) for v in losses]
    out["warmup_s"] = sum(times[: args.warmup])
    out["step_ms_p50"] = statistics.median(measured) * 1e3
    out["step_ms_all"] = [t * 1e3 for t in measured]
    out["tokens_per_s"] = cfg.batch * cfg.seq / statistics.median(measured)
    _, peak1 = _memory_stats(cuda)
    out["peak_gib"] = None
    if peak1 is not None:
        torch_peak = torch.cuda.max_memory_allocated() if cuda else 0
        out["jax_peak_gib"], out["torch_peak_gib"] = peak1 / 2**30, torch_peak / 2**30
        out["peak_gib"] = (peak1 + torch_peak) / 2**30
        if peak0 is not None and peak1 <= peak0:
            out["note"] += "; peak is an upper bound (JAX's high-water mark was set by an earlier run)"
    del st
    return out


def run_torch(impl, cfg, state, batches, n_steps, args, cuda) -> dict:
    """``benchmarks.train``'s run of ``impl`` (the torch model, same weights and batches)."""
    res = train.run_impl(
        impl, cfg, state, [b.to("cuda" if cuda else "cpu") for b in batches], n_steps, args, cuda
    )
    res["impl"] = f"torch-{impl}"
    return res


def loss_check(results: dict, torch_name: str | None, n: int) -> dict:
    """Max |cross-entropy difference| over the first ``n`` steps of each JAX run against torch's."""
    base = results.get(torch_name) if torch_name else None
    if not torch_name:
        return {"note": "no torch run (--compare-torch): no loss-curve check"}
    if not base or base["status"] != "ok":
        return {"note": f"{torch_name} did not finish: no loss-curve check"}
    k = min(n, len(base["losses"]))
    out = {"steps": k, "tolerance": LOSS_TOL}
    for moe in MOE_LAYERS:
        r = results.get(impl_name(moe))
        if r and r["status"] == "ok":
            m = min(k, len(r["losses"]))
            d = max(abs(a - b) for a, b in zip(r["losses"][:m], base["losses"][:m]))
            out[f"{r['impl']}_vs_{torch_name}"] = d
            out[f"{r['impl']}_match"] = d <= LOSS_TOL
    return out


def curves_table(results: dict, n: int) -> str:
    """Markdown table of the loss curves of every finished run, step by step."""
    runs = [r for r in results.values() if r["status"] == "ok"]
    if not runs:
        return ""
    base = runs[0]
    head = (
        "| step | "
        + " | ".join(r["impl"] for r in runs)
        + "".join(f" | {r['impl']} - {base['impl']}" for r in runs[1:])
        + " |"
    )
    lines = [head, "|" + "---|" * (1 + 2 * len(runs) - 1)]
    for i in range(min(n, *(len(r["losses"]) for r in runs))):
        vals = [r["losses"][i] for r in runs]
        lines.append(
            f"| {i + 1} | "
            + " | ".join(f"{v:.4f}" for v in vals)
            + "".join(f" | {v - vals[0]:+.4f}" for v in vals[1:])
            + " |"
        )
    return "\n".join(lines)


def markdown(results: dict, check: dict, counts, n_curve: int) -> str:
    lines = train.results_table(results)
    ok = {k: r for k, r in results.items() if r["status"] == "ok"}
    ratios = []
    bridge = ok.get(impl_name("bridge"))
    if bridge:
        for name, r in ok.items():
            if r is not bridge:
                ratios.append(
                    f"jax-bridge tokens/s = {bridge['tokens_per_s'] / r['tokens_per_s']:.2f}x {name}"
                )
                if bridge.get("peak_gib") and r.get("peak_gib"):
                    ratios.append(
                        f"jax-bridge peak memory = {bridge['peak_gib'] / r['peak_gib']:.2f}x {name}"
                    )
    text = "\n".join(lines) + f"\n\nParameters: {counts[0]:,} total, {counts[1]:,} active per token.\n"
    if ratios:
        text += "\n" + "\n".join(f"- {r}" for r in ratios) + "\n"
    text += (
        "\nLoss curves: "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items())
        + "\n"
    )
    if "steps" in check:
        text += "\n" + curves_table(results, n_curve) + "\n"
    return text


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def run_isolated(name: str, argv: list[str], out: Path, n_steps: int, git) -> dict:
    """Run ``name`` in a fresh process (same flags): its own JAX high-water mark and allocator pools."""
    runs = (out / "runs").resolve()  # the child runs in the repository root
    path = runs / f"{name}.result.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.train", "--framework", "jax", *argv]
    cmd += ["--child-run", name, "--out", str(runs)]
    env = dict(os.environ, FLASHFUSEMOE_GIT=git or "")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, check=False)
    if path.exists():
        return json.loads(path.read_text())
    return {
        "impl": name,
        "status": "error",
        "note": f"its process exited with {proc.returncode}",
        "steps": n_steps,
    }


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cuda = not args.tiny
    cfg = train.TINY if args.tiny else train.ModelConfig()
    if args.layers is not None:
        cfg = train.ModelConfig(**{**cfg.__dict__, "n_layers": args.layers})
    torch_name = f"torch-{args.torch_impl}" if args.compare_torch else None
    runs = ([torch_name] if torch_name else []) + [
        impl_name(m) for m in MOE_LAYERS if m in args.moe or "all" in args.moe
    ]
    if args.child_run is not None:
        if args.child_run not in runs:
            raise SystemExit(f"--child-run {args.child_run!r} is not one of this command's runs {runs}")
        runs = [args.child_run]
    isolate = args.isolate if args.isolate is not None else cuda and len(runs) > 1
    isolate = isolate and args.child_run is None
    n_steps = args.warmup + args.steps
    if args.compare_torch:
        n_steps = max(n_steps, args.check_steps)
    env = environment("cuda" if cuda else "cpu", "benchmarks.train")
    env["flax"] = __import__("flax").__version__
    dtype = jnp.bfloat16 if cuda else jnp.float32
    counts = train.param_counts(train.build_model("unfused-eager", cfg, "meta"))

    out, stem, meta = train.run_files(args, env, cfg, counts, "train-jax")
    meta.update({
        "scan": args.scan,
        "remat": args.remat,
        "attention": args.attention,
        "compute_dtype": jnp.dtype(dtype).name,
        "isolated": isolate,
    })
    results = {}

    def save():
        check = loss_check(results, torch_name, args.check_steps)
        table = markdown(results, check, counts, args.check_steps)
        train.write_results(out, stem, meta, results, check, table, env, ("jax", "flax", "torch", "triton"))
        return check, table

    def report(r):
        results[r["impl"]] = r
        if isolate and r["status"] == "ok":
            pass  # its process logged it
        elif r["status"] == "ok":
            peak = f", peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
            log(
                f"  {r['impl']}: p50 {r['step_ms_p50']:.1f} ms/step, "
                f"{r['tokens_per_s']:,.0f} tokens/s{peak}, warm-up {r['warmup_s']:.1f} s"
            )
        else:
            log(f"  {r['impl']}: {r['status']}: {r['note']}")
        if args.child_run is None:
            save()

    if args.child_run is None:
        log(
            f"Flax NNX training benchmark on {env['device']} (jax {jax.__version__}, "
            f"{jax.default_backend()}): "
            f"{cfg}\n  {counts[0]:,} parameters, {counts[1]:,} active; {cfg.batch * cfg.seq} tokens/step; "
            f"warm-up {args.warmup}, measured {args.steps}; MoE blocks "
            f"{'under nnx.scan' if args.scan else 'in a Python loop'}{', nnx.remat' if args.remat else ''}; "
            f"{jnp.dtype(dtype).name} compute{'; each run in its own process' if isolate else ''}"
        )
    if isolate:
        for name in runs:
            log(f"\n{name}: in its own process")
            report(run_isolated(name, argv, out, n_steps, env["git"]))
    else:
        # --tiny runs on the CPU, as the torch benchmark's, even where JAX has a GPU
        with contextlib.nullcontext() if cuda else jax.default_device(jax.devices("cpu")[0]):
            args.attention_impl, attention_note = resolve_attention(args.attention, cuda, dtype)
            if attention_note:
                log(attention_note)
            state, _ = train.initial_state(cfg, args.seed, "cuda" if cuda else "cpu")
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()  # the torch model that made the weights: give its memory back
            torch_batches = train.make_batches(cfg, n_steps, args.seed, "cpu")
            batches = [jnp.asarray(b.numpy().astype(np.int32)) for b in torch_batches]
            for name in runs:  # torch first: it frees its memory before JAX's allocator grows
                log(f"\n{name}: {n_steps} steps")
                if name == torch_name:
                    report(run_torch(args.torch_impl, cfg, state, torch_batches, n_steps, args, cuda))
                else:
                    report(run_jax(name.removeprefix("jax-"), cfg, state, batches, n_steps, args, cuda))
    if args.child_run is not None:
        (out / f"{args.child_run}.result.json").write_text(json.dumps(results[args.child_run]))
        return 0

    return train.final_report(save, results, out, stem)
