"""PNG plots of the benchmark JSON files.

    python -m benchmarks.plot out/gpu-check-DATE --out docs     # every layer*.json / train*.json found

Writes ``bench_<json stem>.png`` per file: for the layer benchmark, time per implementation
for each shape (the dense limit as a dashed line); for training, tokens/s, peak memory and
the loss curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DENSE = "dense-limit"


def _title(meta: dict) -> str:
    return f"{meta.get('device')}, torch {meta.get('torch')}, {meta.get('date_utc', '')[:10]}"


def plot_layer(data: dict, path: Path) -> Path:
    """One panel per shape: horizontal bars of the median time of each implementation (log scale)."""
    meta, results = data["meta"], data["results"]
    mode = "fwd" if meta.get("fwd_only") else "fwdbwd"
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig, axes = plt.subplots(
        len(shapes), 1, figsize=(10, 0.45 * len(results) + 1.5 * len(shapes)), squeeze=False
    )
    for ax, shape in zip(axes[:, 0], shapes):
        rows = [r for r in results if r["shape"] == shape and r["impl"] != DENSE]
        dense = next((r for r in results if r["shape"] == shape and r["impl"] == DENSE), None)
        names = [r["impl"] for r in rows]
        times = [r[f"{mode}_ms"] or 0 for r in rows]
        colors = ["tab:orange" if n.startswith("ffmoe") or n == "jax-bridge" else "tab:gray" for n in names]
        ax.barh(range(len(rows)), times, color=colors)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        positive = [t for t in times if t > 0]
        if positive:
            ax.set_xscale("log")
        for i, r in enumerate(rows):
            if r["status"] == "ok" and r[f"{mode}_ms"]:
                label = f" {r[f'{mode}_ms']:.2f} ms"
                if r.get(f"{mode}_tflops"):
                    label += f", {r[f'{mode}_tflops']:.0f} TFLOP/s"
                ax.text(r[f"{mode}_ms"], i, label, va="center", fontsize=8)
            else:
                ax.text(min(positive) if positive else 0, i, f" {r['status']}", va="center", fontsize=8)
        if dense and dense[f"{mode}_ms"]:
            ax.axvline(dense[f"{mode}_ms"], color="k", ls="--", lw=1)
            ax.text(dense[f"{mode}_ms"], -0.7, " dense limit", fontsize=8)
        s = meta.get("shapes", {}).get(shape, {})
        ax.set_title(
            f"{shape}: N={s.get('N')} D={s.get('D')} F={s.get('F')} E={s.get('E')} K={s.get('K')}",
            fontsize=10,
            loc="left",
        )
        ax.set_xlabel(f"{'forward' if mode == 'fwd' else 'forward+backward'} ms (median)")
    fig.suptitle(
        f"MoE layer, {'skewed' if meta.get('skew') else 'random'} routing: {_title(meta)}", fontsize=11
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_train(data: dict, path: Path) -> Path:
    """Tokens/s, peak memory and loss curves of the training benchmark."""
    meta, results = data["meta"], data["results"]
    ok = [r for r in results.values() if r["status"] == "ok"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    names = [r["impl"] for r in ok]
    colors = ["tab:orange" if "fused" in n or n == "jax-bridge" else "tab:gray" for n in names]
    a1.bar(names, [r["tokens_per_s"] for r in ok], color=colors)
    a1.set_ylabel("tokens/s (p50 step)")
    a2.bar(names, [r["peak_gib"] or 0 for r in ok], color=colors)
    a2.set_ylabel("peak memory, GiB")
    if not any(r["peak_gib"] for r in ok):
        a2.text(0.5, 0.5, "not measured (CPU)", transform=a2.transAxes, ha="center")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=20)
    for r in ok:
        a3.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["impl"], lw=1)
    a3.set_xlabel("step")
    a3.set_ylabel("cross-entropy loss")
    a3.legend(fontsize=8)
    check = data.get("loss_check", {})
    # the torch benchmark's fused run against unfused-eager; the JAX one's first run against torch
    pairs = [k for k in check if k.endswith("_vs_unfused-eager") and k.startswith("fused-compiled")]
    pairs = pairs or [k for k in check if "_vs_" in k]
    if pairs:
        a, b = pairs[0].split("_vs_")
        a3.set_title(f"max |{a} - {b}| = {check[pairs[0]]:.3g} over {check.get('steps')} steps", fontsize=9)
    fig.suptitle(f"Seed-model training: {_title(meta)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def find_jsons(paths) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.json") if q.name.startswith(("layer", "train")))
        else:
            found.append(p)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Plot benchmark JSON files as PNGs.")
    ap.add_argument("paths", nargs="+", help="JSON files or folders holding layer*.json / train*.json")
    ap.add_argument("--out", default="docs", help="folder for the PNGs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = find_jsons(args.paths)
    if not files:
        print("no layer*.json or train*.json found", file=sys.stderr)
        return 1
    for f in files:
        data = json.loads(f.read_text())
        plot = plot_train if f.name.startswith("train") else plot_layer
        print(f"wrote {plot(data, out / f'bench_{f.stem}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
