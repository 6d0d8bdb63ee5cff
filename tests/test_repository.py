"""The repository speaks of itself alone: no file cites notes outside it."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("../shared", "/work/shared", "shared/facts.md", "shared/anchors.md")


def _files():
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
        return [ROOT / p for p in listed.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")


def test_no_file_cites_notes_outside_the_repository():
    files = _files()
    assert any(p.name == "design.md" for p in files)
    this = Path(__file__).resolve()
    cited = []
    for path in files:
        if path.resolve() == this or not path.is_file() or path.suffix in (".png", ".whl"):
            continue
        text = path.read_text(errors="replace")
        cited += [f"{path.relative_to(ROOT)}: {word}" for word in OUTSIDE if word in text]
    assert not cited, cited
