"""Smoke test of ``python -m benchmarks.hf --tiny``: every implementation runs a training step of each
tiny model on CPU, from the same weights (equal first losses), and the result files are written."""

import json
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
