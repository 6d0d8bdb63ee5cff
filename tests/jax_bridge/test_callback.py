"""jax_bridge.callback: the torch side of the XLA buffer callbacks."""

import warnings

import pytest

pytest.importorskip("jax")
from jax_bridge import callback  # noqa: E402


def test_xla_preallocation_warning(monkeypatch):
    for name in (
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "XLA_PYTHON_CLIENT_ALLOCATOR",
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(callback, "_PREALLOCATION_CHECKED", False)
    with pytest.warns(RuntimeWarning, match="XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        callback._warn_if_xla_preallocates()
    monkeypatch.setattr(callback, "_PREALLOCATION_CHECKED", False)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback._warn_if_xla_preallocates()


def test_dynamic_slice_fusion_off_unless_the_user_set_it():
    env = {}
    callback.default_xla_flags(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=false"}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    callback.default_xla_flags(env)
    assert env["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=4 --xla_gpu_enable_dynamic_slice_fusion=false"
    )
    env = {"XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=true"}
    callback.default_xla_flags(env)
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_dynamic_slice_fusion=true"


def test_ffi_mechanism_from_the_environment():
    assert callback.ffi_default({}) is False
    assert callback.ffi_default({callback.FFI_ENV: "0"}) is False
    assert callback.ffi_default({callback.FFI_ENV: "1"}) is True
    with pytest.raises(ValueError, match="FLASHFUSEMOE_JAX_FFI must be '0' or '1', got 'yes'"):
        callback.ffi_default({callback.FFI_ENV: "yes"})
