"""The built wheel: the Apache-2.0 license text and metadata, and the py.typed markers."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "flashfusemoe", "jax_bridge"]


def test_license_file_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_py_typed_markers_exist():
    for package in ("flashfusemoe", "jax_bridge"):
        assert (ROOT / package / "py.typed").is_file(), package


@pytest.mark.slow
def test_wheel_ships_license_and_py_typed(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build this pyproject offline")
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("flashfusemoe-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "flashfusemoe/py.typed" in names and "jax_bridge/py.typed" in names, names
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(license_name).decode() == (ROOT / "LICENSE").read_text()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text and "License-File: LICENSE" in text, text[:800]
