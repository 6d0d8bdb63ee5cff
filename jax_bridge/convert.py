"""A ``MoELayer`` seen from JAX: hyperparameters, parameter layouts, initialisers, the forward
on a flat parameter dict, and converters to and from a torch ``MoELayer`` ``state_dict``.

The NNX and Linen modules (``jax_bridge.nnx``, ``jax_bridge.linen``) are thin wrappers over
``LayerConfig``, ``init_params`` and ``apply_layer``. Parameters keep the torch names and
layouts: ``router_weight [E, D]``, ``w_up [E, 2F, D]``, ``w_down [E, D, F]``,
``shared_w_up [2Fs, D]``, ``shared_w_down [D, Fs]``, ``shared_gate_weight [1, D]``, and the
non-trainable fp32 buffer ``expert_bias [E]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.typing import DTypeLike

import flashfusemoe
from flashfusemoe.config import LayerConfig
from jax_bridge.ops import moe

__all__ = [
    "BUFFER_NAMES",
    "PARAM_NAMES",
    "apply_layer",
    "check_float_dtype",
    "glu_mlp",
    "init_params",
    "jax_params_to_torch_state_dict",
    "layer_kwargs_from_torch",
    "linen_variables_to_torch_state_dict",
    "load_torch_state_dict_into_nnx",
    "nnx_to_torch_state_dict",
    "numpy_to_torch",
    "torch_state_dict_to_jax",
    "torch_state_dict_to_linen_variables",
    "torch_to_numpy",
    "uniform_init",
]

PARAM_NAMES = ("router_weight", "w_up", "w_down", "shared_w_up", "shared_w_down", "shared_gate_weight")
BUFFER_NAMES = ("expert_bias",)
LINEN_BUFFERS = "buffers"  # the Linen collection holding expert_bias
_HI = jax.lax.Precision.HIGHEST


def check_float_dtype(name: str, dtype: DTypeLike | None, allow_none: bool = False) -> None:
    """``param_dtype`` / ``dtype`` of the Flax modules: a JAX floating dtype (or None where allowed)."""
    if dtype is None and allow_none:
        return
    try:
        floating = dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"{name} must be a floating dtype{' or None' if allow_none else ''}, got {dtype!r}")


def layer_kwargs_from_torch(layer: flashfusemoe.MoELayer) -> dict:
    """Hyperparameters of a torch ``MoELayer`` as the Flax modules' keyword arguments."""
    return layer.config.kwargs()


def uniform_init(fan_in: int) -> Callable[..., jax.Array]:
    """``nn.Linear``'s default scale as a JAX initialiser: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_params(key: jax.Array, config: LayerConfig, param_dtype: DTypeLike = jnp.float32
                ) -> dict[str, jax.Array]:
    """Fresh trainable parameters, each ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and, with
    ``use_expert_bias``, a zero fp32 ``expert_bias``.

    One uniform draw is cut into the parameters (one small compilation per config).
    """
    specs = config.param_specs()
    sizes = [math.prod(shape) for shape, _ in specs.values()]
    unit = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    params, offset = {}, 0
    for (name, (shape, fan_in)), size in zip(specs.items(), sizes):
        w = unit[offset : offset + size].reshape(shape) / math.sqrt(fan_in)
        params[name] = w.astype(param_dtype)
        offset += size
    if config.use_expert_bias:
        params["expert_bias"] = jnp.zeros((config.num_experts,), jnp.float32)
    return params


def _activation(gate, activation: str):
    """``act(gate)`` computed in fp32, rounded once to ``gate``'s dtype (as torch's F.silu/F.gelu do)."""
    g = gate.astype(jnp.float32)
    if activation == "swiglu":
        a = jax.nn.silu(g)
    elif activation == "geglu":
        a = jax.nn.gelu(g, approximate=False)
    else:
        a = jnp.square(jax.nn.relu(g))
    return a.astype(gate.dtype)


def glu_mlp(x: jax.Array, w_up: jax.Array, w_down: jax.Array, activation: str) -> jax.Array:
    """Dense GLU MLP, the shared expert: x [..., D], w_up [2Fs, D], w_down [D, Fs] -> [..., D]."""
    h = jnp.matmul(x, w_up.T, precision=_HI)
    gate, up = jnp.split(h, 2, axis=-1)
    return jnp.matmul(_activation(gate, activation) * up, w_down.T, precision=_HI)


def local_experts(config: LayerConfig, ep_axis) -> int | None:
    """The experts each device of ``ep_axis`` holds (None without ``ep_axis``); call inside ``shard_map``."""
    if ep_axis is None:
        return None
    W = jax.lax.axis_size(ep_axis)
    if config.num_experts % W:
        raise ValueError(f"num_experts={config.num_experts} must be divisible by the size W={W} of "
                         f"ep_axis={ep_axis!r}")
    return config.num_experts // W


def _check_params(params: Mapping, config: LayerConfig, num_local_experts: int | None = None) -> None:
    expected = dict(config.param_specs(num_local_experts))
    if config.use_expert_bias:
        expected["expert_bias"] = ((config.num_experts,), None)
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"parameters do not fit the config: missing {missing}, unexpected {unexpected}")
    for name, (shape, _) in expected.items():
        if tuple(jnp.shape(params[name])) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(jnp.shape(params[name]))}")


def apply_layer(params: Mapping, x: jax.Array, config: LayerConfig, *, dtype: DTypeLike | None = None,
                return_aux: bool = False, ep_axis: str | None = None
                ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """The ``MoELayer`` forward on JAX arrays: ``x [..., D] -> out [..., D]`` (or ``(out, aux)``).

    ``params`` maps the torch names to arrays. Everything but ``expert_bias`` (fp32) is cast to
    the compute ``dtype``: given, or the promoted dtype of ``x`` and the parameters. ``ep_axis``:
    expert parallelism inside ``shard_map`` (w_up/w_down hold this device's E/W experts).
    """
    _check_params(params, config, local_experts(config, ep_axis))
    weights = {k: jnp.asarray(v) for k, v in params.items() if k != "expert_bias"}
    if dtype is None:
        dtype = jnp.result_type(jnp.asarray(x).dtype, *(w.dtype for w in weights.values()))
    x = jnp.asarray(x, dtype)
    w = {k: v.astype(dtype) for k, v in weights.items()}
    expert_bias = params.get("expert_bias")
    if expert_bias is not None:
        expert_bias = jax.lax.stop_gradient(jnp.asarray(expert_bias, jnp.float32))
    result = moe(x, w["router_weight"], w["w_up"], w["w_down"], config.options, expert_bias=expert_bias,
                 return_aux=return_aux, ep_axis=ep_axis)
    out, aux = result if return_aux else (result, None)
    if config.num_shared_experts:
        shared = glu_mlp(x, w["shared_w_up"], w["shared_w_down"], config.options.activation)
        if config.shared_expert_gate:
            gate = jnp.matmul(x, w["shared_gate_weight"].T, precision=_HI)
            shared = shared * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(dtype)
        out = out + shared
    return (out, aux) if return_aux else out


# ---- torch <-> JAX -----------------------------------------------------------------------------


class ParamsModule(Protocol):
    """What the converters need of a module; ``jax_bridge.nnx.FusedMoE`` is one."""

    def params_dict(self) -> dict[str, jax.Array]: ...

    def load_params_dict(self, params: Mapping) -> None: ...


M = TypeVar("M", bound=ParamsModule)


def _check_mapping(name: str, value) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of names to arrays, got {type(value).__name__}")


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """An exact host copy of a torch tensor (bf16 through its bits)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(jnp.bfloat16)
    return t.numpy().copy()


def numpy_to_torch(a: np.ndarray | jax.Array) -> torch.Tensor:
    """An exact torch copy of a host array (bf16 through its bits)."""
    a = np.array(a, copy=True)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_state_dict_to_jax(state_dict: Mapping, *, prefix: str = "") -> dict[str, jax.Array]:
    """A ``MoELayer`` ``state_dict`` (entries under ``prefix``) -> ``{name: jax.Array}``, exact.

    With a prefix (e.g. ``"blocks.0.moe."``) other entries are ignored; without one every entry
    must be a ``MoELayer`` parameter or ``expert_bias``.
    """
    _check_mapping("state_dict", state_dict)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {type(key).__name__} {key!r}")
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in PARAM_NAMES + BUFFER_NAMES:
            raise ValueError(f"{key!r} is not a MoELayer parameter or buffer ({PARAM_NAMES + BUFFER_NAMES})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        out[name] = jnp.asarray(torch_to_numpy(value))
    if not out:
        raise ValueError(f"no state_dict entry starts with prefix {prefix!r}")
    return out


def jax_params_to_torch_state_dict(params: Mapping, *, prefix: str = "") -> dict:
    """``{name: array}`` (``apply_layer``'s params) -> a CPU torch ``state_dict``, exact.

    Load it with ``MoELayer.load_state_dict`` (which copies to the layer's device).
    """
    _check_mapping("params", params)
    state_dict = {}
    for name, value in params.items():
        if name not in PARAM_NAMES + BUFFER_NAMES:
            raise ValueError(f"{name!r} is not a MoELayer parameter or buffer ({PARAM_NAMES + BUFFER_NAMES})")
        value = np.asarray(value)
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {value.dtype}")
        state_dict[prefix + name] = numpy_to_torch(value)
    return state_dict


def nnx_to_torch_state_dict(module: ParamsModule, *, prefix: str = "") -> dict:
    """The parameters and ``expert_bias`` of a ``jax_bridge.nnx.FusedMoE`` as a torch ``state_dict``."""
    return jax_params_to_torch_state_dict(module.params_dict(), prefix=prefix)


def load_torch_state_dict_into_nnx(module: M, state_dict: Mapping, *, prefix: str = "") -> M:
    """Loads a torch ``MoELayer`` ``state_dict`` into a ``jax_bridge.nnx.FusedMoE`` in place.

    Entries must match the module's parameters and shapes; values are cast to the dtypes the
    module's variables have (exact when they already match). Returns the module.
    """
    # Duck-typed: jax_bridge.nnx builds on this module, so this module doesn't import it.
    if not callable(getattr(module, "load_params_dict", None)):
        raise TypeError(f"module must be a jax_bridge.nnx.FusedMoE, got {type(module).__name__}")
    module.load_params_dict(torch_state_dict_to_jax(state_dict, prefix=prefix))
    return module


def torch_state_dict_to_linen_variables(state_dict: Mapping, *, prefix: str = "") -> dict:
    """A torch ``MoELayer`` ``state_dict`` -> Linen variables ``{"params": ..., "buffers": ...}``
    for ``jax_bridge.linen.FusedMoE.apply`` (``"buffers"`` only with ``expert_bias``)."""
    flat = torch_state_dict_to_jax(state_dict, prefix=prefix)
    variables = {"params": {k: v for k, v in flat.items() if k in PARAM_NAMES}}
    if "expert_bias" in flat:
        variables[LINEN_BUFFERS] = {"expert_bias": flat["expert_bias"]}
    return variables


def linen_variables_to_torch_state_dict(variables: Mapping, *, prefix: str = "") -> dict:
    """Linen variables of ``jax_bridge.linen.FusedMoE`` -> a torch ``MoELayer`` ``state_dict``."""
    _check_mapping("variables", variables)
    if "params" not in variables:
        raise ValueError(f"variables must hold a 'params' collection, got {sorted(variables)}")
    flat = dict(variables["params"])
    flat.update(variables.get(LINEN_BUFFERS, {}))
    return jax_params_to_torch_state_dict(flat, prefix=prefix)
