"""The public API is annotated (parameters and return values) and ships a py.typed marker."""

import importlib
import inspect
import typing
from pathlib import Path

import pytest

import flashfusemoe

ROOT = Path(__file__).resolve().parents[1]
# module -> the public names checked (its __all__ unless listed)
PUBLIC = {
    "flashfusemoe": None,
    "flashfusemoe.reference": ["moe_reference"],
    "jax_bridge": None,
    "jax_bridge.convert": None,
    "jax_bridge.nnx": None,
    "jax_bridge.linen": None,
    "jax_bridge.reference": None,
}
# Methods checked on public classes, besides __init__: those defined in the class, not "_"-named.
DUNDERS = ("__init__", "__call__")


def _callables(module_name):
    if module_name.startswith("jax_bridge"):
        pytest.importorskip("jax")
        pytest.importorskip("flax")
    module = importlib.import_module(module_name)
    for name in PUBLIC[module_name] or module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            if issubclass(obj, BaseException) or typing.NamedTuple in getattr(obj, "__orig_bases__", ()):
                continue  # nothing to annotate beyond the class itself / annotated fields
            for attr, member in vars(obj).items():
                if (attr in DUNDERS or not attr.startswith("_")) and inspect.isfunction(member):
                    yield f"{module_name}.{name}.{attr}", member
                elif isinstance(member, classmethod):
                    yield f"{module_name}.{name}.{attr}", member.__func__
                elif isinstance(member, property):
                    yield f"{module_name}.{name}.{attr}", member.fget
        elif callable(obj):
            yield f"{module_name}.{name}", obj


@pytest.mark.parametrize("module_name", list(PUBLIC))
def test_public_callables_are_annotated(module_name):
    missing = []
    for qualname, fn in _callables(module_name):
        sig = inspect.signature(fn)
        for p in list(sig.parameters.values()):
            if p.name in ("self", "cls") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.annotation is inspect.Parameter.empty:
                missing.append(f"{qualname}({p.name})")
        if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
            missing.append(f"{qualname} -> ?")
        typing.get_type_hints(fn)  # the annotations resolve
    assert not missing, missing


def test_dataclass_options_are_annotated():
    hints = typing.get_type_hints(flashfusemoe.MoEOptions)
    assert set(hints) == {f.name for f in flashfusemoe.MoEOptions.__dataclass_fields__.values()}


@pytest.mark.parametrize("package", ["flashfusemoe", "jax_bridge"])
def test_py_typed_marker_is_package_data(package):
    assert (ROOT / package / "py.typed").is_file()
    text = (ROOT / "pyproject.toml").read_text()
    assert f'{package} = ["py.typed"]' in text.split("[tool.setuptools.package-data]")[1]


DOCSTRINGS = {  # object -> what its docstring must tell the caller
    flashfusemoe.MoEOptions: ["top_k", "capacity_factor", "max_tokens_per_expert", "TypeError", "ValueError",
                              "check_num_experts"],
    flashfusemoe.moe: ["x [..., D]", "router_weight [E, D]", "w_up [E, 2F, D]", "w_down [E, D, F]",
                       "expert_bias [E]", "tokens_per_expert", "TypeError/ValueError",
                       "CapacityOverflowError"],
    flashfusemoe.aux_losses: ["[N, E]", "tokens_per_expert", "score_func", "load_balance_loss", "z_loss",
                              "Raises"],
    flashfusemoe.CapacityOverflowError: ['gemm="bmm"', "torch.compile", "max_tokens_per_expert",
                                         "calibrate_max_tokens"],
}


@pytest.mark.parametrize("obj", list(DOCSTRINGS), ids=lambda o: o.__name__)
def test_docstrings_say_what_the_caller_needs(obj):
    doc = inspect.getdoc(obj)
    assert doc and len(doc.splitlines()) > 1, doc
    missing = [word for word in DOCSTRINGS[obj] if word not in doc]
    assert not missing, (missing, doc)
