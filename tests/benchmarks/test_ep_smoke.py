"""Smoke test of ``benchmarks.ep``: one gloo rank through torchrun, tiny shapes, CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ep_benchmark_tiny_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the torch path: timings are not checked, only that it runs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "benchmarks.ep", "--tiny", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "ep-G1-tiny.json").read_text())
    assert [r["impl"] for r in data["results"]] == ["ffmoe-ep", "torch-ep", "ffmoe-local"]
    for r in data["results"]:
        assert r["fwdbwd_ms"] > 0 and r["tokens_per_s"] > 0, r
    assert data["meta"]["torch_ep_max_rel_diff_rank0"] < 1e-4, data["meta"]
