"""``make demo`` inside an activated venv that already has torch (scripts/setup_env.sh).

A venv made from that venv's python sees the base interpreter's packages, not the venv's, so
setup must give its own venv the active venv's packages; and a failed install must stop setup
loudly and leave no stamp. The user's venv here gets its torch through a .pth file pointing at
the packages of the interpreter running the tests (no 2 GB download); to the venv's python that
is installed torch like any other.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: no check, the test runs
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _missing_requirements() -> list[str]:
    """What ``make demo`` would install (the core requirements and the test, jax and bench extras)
    that this interpreter lacks. The tests forbid downloads (``PIP_NO_INDEX``), so they need none."""
    if tomllib is None:
        return []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in ("test", "jax", "bench")
                                      for r in project["optional-dependencies"][extra]]
    missing = []
    for req in map(Requirement, reqs):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req.name)
    return missing


MISSING = _missing_requirements()


def _user_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = subprocess.run([str(path / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]  # where this interpreter's torch lives
    Path(site, "_torch_from_elsewhere.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return path


def _activated(venv: Path) -> dict:
    """The environment ``source venv/bin/activate`` makes, less this test run's settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHONHOME", "PYTHON", "VENV", "VIRTUAL_ENV",
                        "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_NO_INDEX"] = "1"  # everything is installed already: nothing may be downloaded
    return env


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING} installed (downloads are off in this test)")
def test_make_demo_in_an_activated_venv_with_torch(tmp_path):
    user = _user_venv(tmp_path / "user-venv")
    env = _activated(user)
    assert subprocess.run(["python", "-c", "import torch"], env=env).returncode == 0
    venv = tmp_path / "project-venv"
    proc = subprocess.run(["make", "-C", str(ROOT), "demo", f"VENV={venv}"], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "OK: max relative error" in out, out
    assert "PASS:" in out or "jax is not installed" in out, out
    assert (venv / ".installed").read_text().split()[0] == str(user / "bin" / "python")
    # Set up once: the second run finds the stamp and does nothing.
    again = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, env={**env, "VENV": str(venv)},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr


def test_failed_setup_is_loud_and_leaves_no_stamp(tmp_path):
    """The install step fails (a constraint no version meets, no index): setup says so, stops and
    writes no stamp, so the next ``make demo`` tries again instead of running a broken venv."""
    env = _activated(_user_venv(tmp_path / "user-venv"))
    constraints = tmp_path / "impossible.txt"
    constraints.write_text("flashfusemoe==0.0.0\n")
    env["PIP_CONSTRAINT"] = str(constraints)
    venv = tmp_path / "project-venv"
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, env={**env, "VENV": str(venv)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "setup: FAILED" in proc.stderr, proc.stderr
    assert not (venv / ".installed").exists()
