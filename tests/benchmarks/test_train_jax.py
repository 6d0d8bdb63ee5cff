"""Smoke test of ``python -m benchmarks.train --framework jax``: ``--tiny`` runs on CPU end to end,
both MoE layers and the torch comparison, and writes its results (timings are not checked)."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import train  # noqa: E402


def test_train_jax_tiny_runs_and_compares_with_torch(tmp_path):
    rc = train.main(["--framework", "jax", "--tiny", "--compare-torch", "--remat", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "train-jax-tiny.json").read_text())
    results = data["results"]
    assert list(results) == ["torch-fused-compiled", "jax-bridge", "jax-ragged_dot"]
    for r in results.values():
        assert r["status"] == "ok", r
        assert len(r["losses"]) == r["steps"] == 2 and all(math.isfinite(v) for v in r["losses"])
        assert r["tokens_per_s"] > 0
    assert data["meta"]["scan"] and data["meta"]["remat"] and data["meta"]["params_total"] == 38176
    check = data["loss_check"]
    # float32 on CPU from the same weights: the curves agree to ~1e-6 (bound: 0.05, bf16 noise on GPU)
    for impl in ("jax-bridge", "jax-ragged_dot"):
        assert check[f"{impl}_match"] and check[f"{impl}_vs_torch-fused-compiled"] < 1e-4, check
    md = (tmp_path / "train-jax-tiny.md").read_text()
    assert "| jax-bridge |" in md and "| step | torch-fused-compiled | jax-bridge |" in md


def test_train_jax_tiny_isolated_runs(tmp_path):
    """--isolate (the default on GPU): each run in its own process, results gathered by the parent."""
    rc = train.main(
        ["--framework", "jax", "--tiny", "--moe", "ragged_dot", "--isolate", "--out", str(tmp_path)]
    )
    assert rc == 0
    data = json.loads((tmp_path / "train-jax-tiny.json").read_text())
    assert data["meta"]["isolated"] and list(data["results"]) == ["jax-ragged_dot"]
    r = data["results"]["jax-ragged_dot"]
    assert r["status"] == "ok" and len(r["losses"]) == 2 and r["tokens_per_s"] > 0, r
    assert (tmp_path / "runs" / "jax-ragged_dot.result.json").exists()


@pytest.mark.gpu
def test_gpu_bf16_training_agrees_with_torch():
    """A small bf16 model on the GPU: both JAX MoE layers (bridge under nnx.scan + nnx.remat with
    the attention --attention auto picks) follow torch's fused model from the same weights."""
    from benchmarks import train_jax
    from benchmarks.flax_model import MOE_LAYERS

    cfg = dataclasses.replace(
        train.ModelConfig(),
        vocab=4096,
        d_model=256,
        n_heads=4,
        n_layers=3,
        dense_ffn=1024,
        expert_ffn=384,
        seq=256,
        batch=4,
    )
    n = 10
    args = train_jax.parse_args(["--warmup", "2", "--steps", str(n - 2), "--remat"])
    assert not args.tiny
    args.attention_impl, note = train_jax.resolve_attention("auto", True, jnp.bfloat16)
    state, _ = train.initial_state(cfg, 0, "cuda")
    torch_batches = train.make_batches(cfg, n, 0, "cpu")
    batches = [jnp.asarray(b.numpy().astype(np.int32)) for b in torch_batches]
    ref = train_jax.run_torch("fused-eager", cfg, state, torch_batches, n, args, True)
    assert ref["status"] == "ok", ref
    for moe in MOE_LAYERS:
        r = train_jax.run_jax(moe, cfg, state, batches, n, args, True)
        assert r["status"] == "ok", r
        assert r["peak_gib"] > 0 and r["jax_peak_gib"] > 0, r
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"], strict=True))
        assert diff < train.LOSS_TOL, (moe, args.attention_impl, note, r["losses"], ref["losses"])
