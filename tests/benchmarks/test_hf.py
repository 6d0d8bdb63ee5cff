"""Smoke test of ``python -m benchmarks.hf --tiny``: every implementation runs a training step of each
tiny model on CPU, from the same weights (equal first losses), and the result files are written."""

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import hf  # noqa: E402


def test_hf_tiny_runs_and_writes_results(tmp_path):
    assert hf.main(["--tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "hf-tiny.json").read_text())["results"]
    assert [(r["model"], r["impl"]) for r in results] == [(m, i) for m in hf.MODELS for i in hf.IMPLS]
    for model in hf.MODELS:
        rows = [r for r in results if r["model"] == model]
        assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
        first = [r["losses"][0] for r in rows]
        assert max(first) - min(first) < 1e-4, first
    assert (tmp_path / "hf-tiny.md").read_text().count("| ok |") == len(results)


def test_hf_rounds_alternate_the_order_and_merge(tmp_path):
    argv = ["--tiny", "--model", "mixtral", "--impl", "grouped_mm", "flashfusemoe", "--rounds", "3",
            "--out", str(tmp_path)]
    assert hf.main(argv) == 0
    results = json.loads((tmp_path / "hf-tiny.json").read_text())["results"]
    order = [(r["impl"], r["round"]) for r in results]
    assert order == [("grouped_mm", 0), ("flashfusemoe", 0), ("flashfusemoe", 1), ("grouped_mm", 1),
                     ("grouped_mm", 2), ("flashfusemoe", 2)]
    merged = hf.merge_rounds(results)
    assert [m["impl"] for m in merged] == ["grouped_mm", "flashfusemoe"]
    for m in merged:
        rows = [r for r in results if r["impl"] == m["impl"]]
        assert m["round_p50"] == [r["step_ms_p50"] for r in rows]
        assert sorted(m["step_ms_all"]) == sorted(t for r in rows for t in r["step_ms_all"])
        assert m["losses"] == rows[0]["losses"]
    table = (tmp_path / "hf-tiny.md").read_text()
    assert table.count("| ok |") == 2 and table.count(" / ") >= 4


def test_hf_rounds_failure_wins():
    ok = {"model": "m", "impl": "a", "status": "ok", "step_ms_p50": 2.0, "step_ms_all": [2.0],
          "tokens_per_s": 5.0, "peak_gib": 1.0, "losses": [1.0]}
    oom = {"model": "m", "impl": "a", "status": "OOM", "note": "x"}
    assert hf.merge_rounds([ok, oom])[0]["status"] == "OOM"
    assert hf.merge_rounds([oom, ok])[0]["status"] == "OOM"
    slower = {**ok, "step_ms_p50": 4.0, "step_ms_all": [4.0], "tokens_per_s": 2.5, "peak_gib": 3.0}
    two = hf.merge_rounds([ok, slower])[0]
    assert two["step_ms_p50"] == 3.0 and two["round_p50"] == [2.0, 4.0] and two["peak_gib"] == 3.0
    assert math.isclose(two["tokens_per_s"], 5.0 * 2.0 / 3.0)


def test_hf_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        hf.parse_args(["--tiny", "--rounds", "0"])
