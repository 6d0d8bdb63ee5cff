"""Imports flow one way: flashfusemoe never imports jax_bridge, no package module imports itself
round a cycle, and a missing optional dependency says how to install it."""

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flashfusemoe", "jax_bridge")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module of ours that ``name`` imports, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            # from pkg import mod -> pkg.mod; from pkg import attr -> pkg
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # pkg.mod.attr -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_graph_sees_known_imports():
    assert {"jax_bridge.ops", "flashfusemoe.config"} <= GRAPH["jax_bridge.convert"]
    assert "jax_bridge.convert" in GRAPH["jax_bridge.nnx"]


def test_flashfusemoe_imports_nothing_from_jax_bridge():
    offenders = {n: sorted(t for t in deps if t.split(".")[0] == "jax_bridge")
                 for n, deps in GRAPH.items() if n.split(".")[0] == "flashfusemoe"}
    assert not {n: d for n, d in offenders.items() if d}, offenders
    dynamic = re.compile(r"""(import_module|__import__|find_spec)\(\s*['"]jax_bridge""")
    for path in (ROOT / "flashfusemoe").rglob("*.py"):
        assert not dynamic.search(path.read_text()), path


def test_no_import_cycles():
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_jax_bridge_convert_imports_alone():
    pytest.importorskip("jax")
    proc = _python("""
        import sys
        import jax_bridge.convert
        assert not {"jax_bridge.nnx", "jax_bridge.linen", "flax"} & set(sys.modules), sorted(sys.modules)
        assert callable(jax_bridge.convert.load_torch_state_dict_into_nnx)
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# Pretends that the named top-level modules are not installed.
_HIDE = """
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Hide())
"""


@pytest.mark.parametrize("hidden,module", [(("jax", "jaxlib"), "jax_bridge"),
                                           (("jaxlib",), "jax_bridge"),
                                           (("jax", "jaxlib"), "jax_bridge.nnx"),
                                           (("flax",), "jax_bridge.nnx"),
                                           (("flax",), "jax_bridge.linen")])
def test_missing_jax_extra_says_how_to_install_it(hidden, module):
    if "flax" in hidden:
        pytest.importorskip("jax")
    proc = _python(f"HIDDEN = {hidden!r}\n" + textwrap.dedent(_HIDE) + textwrap.dedent(f"""
        try:
            import {module}
        except ModuleNotFoundError as e:
            print(type(e).__name__, e.name, "|", e)
        else:
            print("imported")
    """))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ModuleNotFoundError {hidden[0]} |"), proc.stdout
    assert 'pip install "flashfusemoe[jax]"' in proc.stdout, proc.stdout


def test_flashfusemoe_imports_without_jax():
    proc = _python("HIDDEN = ('jax', 'jaxlib', 'flax')\n" + textwrap.dedent(_HIDE) + textwrap.dedent("""
        import flashfusemoe, flashfusemoe.demo
        print("ok")
    """))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
