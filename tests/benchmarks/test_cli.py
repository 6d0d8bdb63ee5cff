"""The benchmark command lines: ``--help`` renders, and every timing runs after a warm-up."""

import importlib
import pkgutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
from benchmarks import layer, train  # noqa: E402

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))


def test_there_are_command_lines_to_check():
    assert {"layer", "train", "plot", "routing_variants"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_help_exits_zero(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    if not hasattr(module, "main"):
        pytest.skip(f"benchmarks.{name} has no command line")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_layer_skew_help_renders_the_percentage(capsys):
    with pytest.raises(SystemExit):
        layer.main(["--help"])
    assert f"~{layer.SKEW_FRACTION:.0%} of tokens pick expert 0" in capsys.readouterr().out


def test_hf_without_transformers_names_the_extra(monkeypatch, tmp_path):
    from benchmarks import hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(SystemExit, match=r"needs transformers: pip install 'flashfusemoe\[hf\]'"):
        hf.main(["--tiny", "--out", str(tmp_path)])


def _parse(module, argv):
    return layer.run_restoring_threads(module.parse_args, argv)  # --tiny lowers torch's threads


@pytest.mark.parametrize("module", [layer, train])
def test_warmup_is_at_least_one(module):
    assert _parse(module, ["--tiny"]).warmup >= 1
    assert _parse(module, ["--tiny", "--warmup", "2"]).warmup == 2
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as info:
            _parse(module, ["--tiny", "--warmup", bad])
        assert info.value.code == 2


def test_tiny_timing_leaves_out_the_first_call():
    """The first call stands for a compilation (jax.jit): with --tiny's defaults it is not timed."""
    cfg = _parse(layer, ["--tiny"])
    calls = []

    def run(i):
        calls.append(i)
        if len(calls) == 1:
            time.sleep(0.3)

    ms = layer.time_ms(run, 1, cfg, cuda=False)
    assert len(calls) == cfg.warmup + cfg.iters
    assert ms < 150, f"the first (compiling) call was timed: {ms:.1f} ms"
