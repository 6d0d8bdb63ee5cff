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
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from flashfusemoe.config import MoEOptions, check_layer_args
from jax_bridge.ops import fused_moe

__all__ = [
    "BUFFER_NAMES",
    "PARAM_NAMES",
    "LayerConfig",
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


@dataclass(frozen=True)
class LayerConfig:
    """The hyperparameters of ``flashfusemoe.MoELayer``, checked the same way."""

    d_model: int
    ffn_dim: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    use_expert_bias: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None
    gemm: str = "auto"
    max_tokens_per_expert: int | None = None
    recompute: bool = False
    num_shared_experts: int = 0
    shared_ffn_dim: int | None = None
    shared_expert_gate: bool = False

    def __post_init__(self):
        check_layer_args(self.d_model, self.ffn_dim, self.num_experts, self.num_shared_experts,
                         self.shared_ffn_dim, self.shared_expert_gate, self.use_expert_bias)
        self.moe_options().check_num_experts(self.num_experts)

    def moe_options(self) -> MoEOptions:
        names = MoEOptions.__dataclass_fields__
        return MoEOptions(**{k: v for k, v in asdict(self).items() if k in names})

    def fused_moe_kwargs(self) -> dict:
        """Keyword options of ``fused_moe`` (all but ``top_k``, ``expert_bias``, ``return_aux``)."""
        return {k: v for k, v in asdict(self.moe_options()).items() if k != "top_k"}

    @property
    def resolved_shared_ffn_dim(self) -> int:
        """``Fs``: 0 without shared experts, else ``shared_ffn_dim or ffn_dim * num_shared_experts``."""
        if not self.num_shared_experts:
            return 0
        return self.shared_ffn_dim or self.ffn_dim * self.num_shared_experts

    def param_specs(self, num_local_experts: int | None = None) -> dict[str, tuple[tuple[int, ...], int]]:
        """``{name: (shape, fan_in)}`` of the trainable parameters this config has (with
        ``num_local_experts``: w_up/w_down of that many experts, a device's share under ``ep_axis``)."""
        D, F, E, Fs = self.d_model, self.ffn_dim, self.num_experts, self.resolved_shared_ffn_dim
        El = E if num_local_experts is None else num_local_experts
        specs = {"router_weight": ((E, D), D), "w_up": ((El, 2 * F, D), D), "w_down": ((El, D, F), F)}
        if Fs:
            specs["shared_w_up"] = ((2 * Fs, D), D)
            specs["shared_w_down"] = ((D, Fs), Fs)
        if self.shared_expert_gate:
            specs["shared_gate_weight"] = ((1, D), D)
        return specs


def check_float_dtype(name: str, dtype, allow_none: bool = False) -> None:
    """``param_dtype`` / ``dtype`` of the Flax modules: a JAX floating dtype (or None where allowed)."""
    if dtype is None and allow_none:
        return
    try:
        floating = dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"{name} must be a floating dtype{' or None' if allow_none else ''}, got {dtype!r}")


def layer_kwargs_from_torch(layer) -> dict:
    """Hyperparameters of a torch ``MoELayer`` as ``LayerConfig`` / module keyword arguments."""
    kwargs = asdict(layer.options)
    kwargs.update(
        d_model=layer.d_model,
        ffn_dim=layer.ffn_dim,
        num_experts=layer.num_experts,
        use_expert_bias=layer.expert_bias is not None,
        shared_expert_gate=layer.shared_gate_weight is not None,
    )
    if layer.shared_ffn_dim:
        kwargs.update(num_shared_experts=1, shared_ffn_dim=layer.shared_ffn_dim)
    return kwargs


def uniform_init(fan_in: int):
    """``nn.Linear``'s default scale as a JAX initialiser: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_params(key, config: LayerConfig, param_dtype=jnp.float32) -> dict[str, jax.Array]:
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


def glu_mlp(x, w_up, w_down, activation: str):
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


def apply_layer(params: Mapping, x, config: LayerConfig, *, dtype=None, return_aux: bool = False,
                ep_axis=None):
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
    result = fused_moe(
        x,
        w["router_weight"],
        w["w_up"],
        w["w_down"],
        config.top_k,
        expert_bias=expert_bias,
        return_aux=return_aux,
        ep_axis=ep_axis,
        **config.fused_moe_kwargs(),
    )
    out, aux = result if return_aux else (result, None)
    if config.num_shared_experts:
        shared = glu_mlp(x, w["shared_w_up"], w["shared_w_down"], config.activation)
        if config.shared_expert_gate:
            gate = jnp.matmul(x, w["shared_gate_weight"].T, precision=_HI)
            shared = shared * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(dtype)
        out = out + shared
    return (out, aux) if return_aux else out


# ---- torch <-> JAX -----------------------------------------------------------------------------


def _check_mapping(name: str, value) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of names to arrays, got {type(value).__name__}")


def torch_to_numpy(t) -> np.ndarray:
    """An exact host copy of a torch tensor (bf16 through its bits)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(jnp.bfloat16)
    return t.numpy().copy()


def numpy_to_torch(a):
    """An exact torch copy of a host array (bf16 through its bits)."""
    import torch

    a = np.array(a, copy=True)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_state_dict_to_jax(state_dict: Mapping, *, prefix: str = "") -> dict[str, jax.Array]:
    """A ``MoELayer`` ``state_dict`` (entries under ``prefix``) -> ``{name: jax.Array}``, exact.

    With a prefix (e.g. ``"blocks.0.moe."``) other entries are ignored; without one every entry
    must be a ``MoELayer`` parameter or ``expert_bias``.
    """
    import torch

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


def nnx_to_torch_state_dict(module, *, prefix: str = "") -> dict:
    """The parameters and ``expert_bias`` of a ``jax_bridge.nnx.FusedMoE`` as a torch ``state_dict``."""
    return jax_params_to_torch_state_dict(module.params_dict(), prefix=prefix)


def load_torch_state_dict_into_nnx(module, state_dict: Mapping, *, prefix: str = ""):
    """Loads a torch ``MoELayer`` ``state_dict`` into a ``jax_bridge.nnx.FusedMoE`` in place.

    Entries must match the module's parameters and shapes; values are cast to the dtypes the
    module's variables have (exact when they already match). Returns the module.
    """
    from jax_bridge.nnx import FusedMoE

    if not isinstance(module, FusedMoE):
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
