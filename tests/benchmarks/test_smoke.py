"""Smoke test of the benchmarks: ``--tiny`` runs on CPU end to end and writes its results.

Timings are not checked (CPU, interpreted kernels); what must hold is that every
implementation runs, the result files are complete, and the fused training run follows the
unfused loss curve (float32 on CPU: the losses agree to ~1e-6, far inside the 0.05 bound).
"""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import layer, plot, train  # noqa: E402

# Interpreted kernels cost seconds per call: leave out ffmoe-auto (it is "grouped" on CPU),
# ffmoe-bmm-2x (the code path of ffmoe-bmm-cal with another max_tokens) and ffmoe-gathered /
# ffmoe-fused_dgrad (the code path of ffmoe-grouped with another gemm=; their kernels have their
# own tests).
SAME_PATH_AS_GROUPED = ("ffmoe-gathered", "ffmoe-fused_dgrad")
IMPLS = [i for i in layer.IMPLS if i not in ("ffmoe-auto", "ffmoe-bmm-2x", *SAME_PATH_AS_GROUPED)]


def test_left_out_impls_name_real_gemm_choices():
    from flashfusemoe import MoEOptions

    for impl in SAME_PATH_AS_GROUPED:
        assert MoEOptions(top_k=2, gemm=impl.removeprefix("ffmoe-")).gemm == impl.removeprefix("ffmoe-")


def test_layer_tiny_runs_and_writes_results(tmp_path):
    rc = layer.main(["--tiny", "--sets", "1", "--out", str(tmp_path), "--impl", *IMPLS])
    assert rc == 0
    data = json.loads((tmp_path / "layer-tiny.json").read_text())
    assert (tmp_path / "layer-tiny.md").read_text().count("\n| seed |") == len(IMPLS) + 1
    rows = {r["impl"]: r for r in data["results"]}
    assert set(rows) == {layer.DENSE, *IMPLS}
    assert rows["ffmoe-graphed"]["status"] == "skipped" and "GPU" in rows["ffmoe-graphed"]["note"]
    for name in [layer.DENSE, *(i for i in IMPLS if i in layer.TORCH_IMPLS and i != "ffmoe-graphed")]:
        r = rows[name]
        assert r["status"] == "ok", (name, r["note"])
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["pipelined_ms"] > 0 and r["fwdbwd_tflops"] > 0, r
    for name in layer.JAX_IMPLS:  # skipped only when the module is missing, never an error
        assert rows[name]["status"] in ("ok", "skipped"), rows[name]
        assert rows[name]["status"] == "ok" or "not importable" in rows[name]["note"]
    assert rows["ffmoe-grouped"]["fwdbwd_frac_dense"] > 0
    assert rows["reference-eager"]["fwdbwd_speedup_vs_reference"] == 1.0
    assert data["meta"]["shapes"]["seed"]["E"] == 8

    assert plot.main([str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "bench_layer-tiny.png").stat().st_size > 0


def test_train_tiny_runs_and_losses_match(tmp_path):
    rc = train.main(["--tiny", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "train-tiny.json").read_text())
    results = data["results"]
    assert list(results) == list(train.DEFAULT_IMPLS)
    for r in results.values():
        assert r["status"] == "ok", r
        assert len(r["losses"]) == r["steps"] and all(math.isfinite(v) for v in r["losses"])
        assert r["tokens_per_s"] > 0
    check = data["loss_check"]
    assert check["fused-compiled_match"] and check["fused-compiled_vs_unfused-eager"] < 1e-3
    assert (tmp_path / "train-tiny.md").exists()


def test_skew_sends_thirty_percent_of_tokens_to_expert_zero():
    # E=16, K=2: uniform routing gives each expert 12.5% of the tokens, so 30% is a clear outlier.
    shape, seed = (512, 32, 32, 16, 2), int(layer.torch.randint(0, 2**31, ()))
    skewed = layer.make_problem("s", shape, layer.torch.float32, "cpu", 1, True, seed=seed)
    flat = layer.make_problem("s", shape, layer.torch.float32, "cpu", 1, False, seed=seed)
    # Only router row 0 changes, by a scale > 1; inputs are the same.
    assert layer.torch.equal(skewed.xs[0], flat.xs[0])
    assert layer.torch.equal(skewed.router_weight[1:], flat.router_weight[1:])
    scale = skewed.routing["skew_scale"]
    assert scale > 1 and layer.torch.allclose(skewed.router_weight[0], scale * flat.router_weight[0])
    assert skewed.routing["hot_expert"] == 0
    # The bisection stops at the first scale reaching 30%; a scale step moves ~1 token of 512.
    frac = skewed.routing["hot_expert_token_fraction"]
    assert abs(frac - layer.SKEW_FRACTION) < 0.02, skewed.routing
    # Expert 0's load is frac * N against a mean of N * K / E.
    assert abs(skewed.routing["max_over_mean"] - frac * 16 / 2) < 1e-9


def test_train_compile_mode_reaches_every_compiled_run(tmp_path):
    rc = train.main(["--tiny", "--impl", "fused-compiled", "--compile-mode", "reduce-overhead",
                     "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "train-tiny.json").read_text())["results"]["fused-compiled"]
    assert result["status"] == "ok", result
    assert result["note"] == "torch.compile(backend=eager, mode=reduce-overhead), per block"


def test_training_exit_status_counts_failed_runs_and_loss_mismatches(tmp_path, capsys):
    ok, broken = {"impl": "a", "status": "ok"}, {"impl": "b", "status": "error"}

    def report(results, check):
        return train.final_report(lambda: (check, "| table |"), results, tmp_path, "train")

    assert report({"a": ok}, {"b_match": True, "max_diff": 0.01}) == 0
    assert report({"a": ok, "b": broken}, {"b_match": True}) == 1
    assert report({"a": ok}, {"b_match": False}) == 1
    out = capsys.readouterr().out
    assert "| table |" in out and "FAILED: ['b']" in out and "FAILED: ['b_match']" in out
