"""The README's first Python snippet runs as written on a CPU-only machine, and the README says
how to install the package (with the [jax] extra, and the CPU build of torch)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_first_python_snippet_runs_on_cpu():
    snippet = _blocks("python")[0]
    assert ".cuda()" in snippet and "is_available()" in snippet  # the GPU line is conditional
    check = "\nassert out.shape == x.shape and out.device.type == 'cpu' and torch.isfinite(out).all()"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only machine, even on the GPU machine
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", snippet + check], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_install_instructions():
    shell = "\n".join(_blocks("bash"))
    assert re.search(r'pip install "[^"]*\[jax\]"', shell), shell
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in shell, shell
    assert re.search(r"pip install \S*flashfusemoe", shell), shell
