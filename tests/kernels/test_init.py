"""flashfusemoe.kernels: the interpreter's scalar-index fix (Triton 3.6; numpy 1.25+ warns, 2.4+ raises)."""

import types

import numpy as np
import pytest

from flashfusemoe import kernels


class _Scope:
    def __init__(self):
        self.attrs = {}

    def set_attr(self, obj, name, value):
        self.attrs[name] = value


def _fake_interpreter():
    def patch_lang_tensor(tensor, scope):  # as Triton 3.6: int() of the scalar's 1-element array
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))
        scope.set_attr(tensor, "__bool__", lambda self: True)

    return types.SimpleNamespace(_patch_lang_tensor=patch_lang_tensor)


def _scalar(data):
    return types.SimpleNamespace(handle=types.SimpleNamespace(data=np.asarray(data)))


def test_scalar_index_fix_patches_only_where_numpy_deprecates_the_conversion(monkeypatch):
    interp = _fake_interpreter()
    monkeypatch.setattr(kernels, "_numpy_deprecates_int_of_1d", lambda: False)
    assert kernels.interpreter_scalar_index_fix(interp) is False
    monkeypatch.setattr(kernels, "_numpy_deprecates_int_of_1d", lambda: True)
    assert kernels.interpreter_scalar_index_fix(interp) is True
    assert kernels.interpreter_scalar_index_fix(interp) is False  # once only
    scope = _Scope()
    interp._patch_lang_tensor("tensor", scope)
    index = scope.attrs["__index__"]
    assert "__bool__" in scope.attrs  # the rest of Triton's patch still applies
    assert index(_scalar([7])) == 7 and index(_scalar(np.int64(3))) == 3
    with pytest.raises(TypeError, match=r"only a scalar converts to an int, got an array of shape \(2,\)"):
        index(_scalar([1, 2]))
    assert kernels.interpreter_scalar_index_fix(types.SimpleNamespace()) is False  # no such patch


def test_numpy_probe_matches_this_numpy():
    major, minor = (int(v) for v in np.__version__.split(".")[:2])
    assert kernels._numpy_deprecates_int_of_1d() == ((major, minor) >= (1, 25))
