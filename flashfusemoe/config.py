"""Options of the fused MoE layer, validated in one place."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields

import torch

ACTIVATIONS = ("swiglu", "geglu", "relu2")
SCORE_FUNCS = ("softmax", "sigmoid")
GEMMS = ("auto", "grouped", "gathered", "fused_dgrad", "bmm")
# "auto" runs "gathered" up to this expert width F and "fused_dgrad" or "grouped" above
# (docs/benchmarks.md: the gathered up-projection beat gather + grouped GEMM + GLU at F=256 and tied
# or trailed at F>=1408; the fused input gradient of the down-projection beat the grouped GEMM + GLU
# backward at D=1024 and 2048 and trailed at D=4096).
GATHERED_MAX_FFN = 512
FUSED_DGRAD_MAX_D_MODEL = 2048
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def check_finite(name: str, value, allow_zero: bool = False) -> None:
    """``value`` is a finite float (or int) > 0, or >= 0 with ``allow_zero``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value} must be a finite number {'>=' if allow_zero else '>'} 0")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


@dataclass(frozen=True)
class MoEOptions:
    """Everything about one MoE call except its tensors; the one place an option is declared.

    ``fused_moe``, ``MoELayer``, ``jax_bridge.fused_moe`` and the Flax modules take these fields as
    keyword arguments. Construction checks every value and raises ``TypeError`` (wrong type) or
    ``ValueError`` (bad value or combination) naming the option; ``check_num_experts`` checks what
    depends on E. Exact semantics: ``docs/design.md``.

    - ``top_k``: experts per token, 1 <= top_k <= E.
    - ``activation``: the GLU of each expert, ``"swiglu"`` (silu), ``"geglu"`` (erf gelu) or
      ``"relu2"`` (relu squared); ``w_up`` rows 0:F are the gate, F:2F the up projection.
    - ``score_func``: ``"softmax"`` or ``"sigmoid"`` router scores.
    - ``norm_topk_prob``: renormalise the K selected scores to sum to 1.
    - ``n_group``, ``topk_group``: group-limited routing (DeepSeek-V3): experts form ``n_group``
      groups, a token picks among the ``topk_group`` groups with the best top-2 score sums.
    - ``routed_scaling_factor``: multiplies the routing weights.
    - ``capacity_factor``: opt-in token dropping: each expert keeps at most
      ``ceil(capacity_factor * N * top_k / E)`` assignments (the highest-weight ones), and the
      drops are counted in ``aux["dropped_tokens"]``. None (default): dropless.
    - ``gemm``: how the expert GEMMs run. ``"grouped"``: unpadded, dropless, no host sync: the
      tokens gathered into expert order, grouped GEMMs (CUTLASS / cuBLAS), a GLU kernel.
      ``"gathered"``: the same layout, but the up-projection reads its rows from x by token index
      and applies the GLU in its epilogue (no copy of x, no GLU pass); in backward the two GEMMs
      that read the output gradient per row read it by token index (no copy of it).
      ``"fused_dgrad"``: the forward of ``"gathered"`` (x read by token index, the GLU in the
      up-projection's epilogue), and the backward of ``"grouped"`` except that the
      down-projection's input-gradient GEMM runs the GLU backward in its epilogue (a Triton kernel;
      16-bit on sm90+, else the grouped GEMM and the GLU backward kernel). ``"bmm"``: the padded
      ``[E, max_tokens, D]`` layout and ``torch.bmm`` (an overflowing expert grows it with one host
      sync in eager mode, and raises ``CapacityOverflowError`` where it can't grow). ``"auto"``
      (default): ``"gathered"`` for experts of width F <= ``GATHERED_MAX_FFN`` (512), else
      ``"fused_dgrad"`` for d_model <= ``FUSED_DGRAD_MAX_D_MODEL`` (2048), else ``"grouped"``: the
      same rule in torch and JAX.
    - ``max_tokens_per_expert``: the padded layout's rows per expert with ``gemm="bmm"`` (default:
      twice the mean load; see ``calibrate_max_tokens``).
    - ``recompute``: save only x and the routing metadata for backward and recompute the
      pre-activation there (less memory, one more GEMM).
    """

    top_k: int
    activation: str = "swiglu"
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None
    gemm: str = "auto"
    max_tokens_per_expert: int | None = None
    recompute: bool = False

    def __post_init__(self):
        check_int("top_k", self.top_k, minimum=1)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("gemm", self.gemm, GEMMS)
        check_bool("norm_topk_prob", self.norm_topk_prob)
        check_bool("recompute", self.recompute)
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                f"n_group={self.n_group} and topk_group={self.topk_group} must be given together"
            )
        if self.n_group is not None:
            check_int("n_group", self.n_group, minimum=1)
            check_int("topk_group", self.topk_group, minimum=1)
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        check_finite("routed_scaling_factor", self.routed_scaling_factor)
        if self.capacity_factor is not None:
            check_finite("capacity_factor", self.capacity_factor)
        if self.max_tokens_per_expert is not None:
            check_int("max_tokens_per_expert", self.max_tokens_per_expert, minimum=1)
            # It sizes the padded layout, which "grouped" doesn't have and capacity sizes itself.
            if self.gemm != "bmm":
                runs = f"gemm={self.gemm!r} has none" if self.gemm != "auto" else (
                    "it runs gemm='auto' as 'grouped' or 'gathered', which have none: pass gemm='bmm'")
                raise ValueError(
                    f"max_tokens_per_expert={self.max_tokens_per_expert} sizes the padded layout of "
                    f"gemm='bmm'; {runs}"
                )
            if self.capacity_factor is not None:
                raise ValueError(
                    f"max_tokens_per_expert={self.max_tokens_per_expert} and "
                    f"capacity_factor={self.capacity_factor} both size the padded layout; give one"
                )

    def check_num_experts(self, num_experts: int) -> None:
        """Checks the options that depend on E."""
        if self.top_k > num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={num_experts}")
        if self.n_group is None:
            return
        if num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={num_experts}")
        allowed = self.topk_group * (num_experts // self.n_group)
        if self.top_k > allowed:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {allowed} experts that topk_group={self.topk_group} "
                f"of n_group={self.n_group} groups leave"
            )

    def resolved_gemm(self, d_model: int, ffn_dim: int) -> str:
        """What ``gemm`` runs for ``d_model`` (D) and experts of width ``ffn_dim`` (F): ``"auto"`` is
        ``"gathered"`` up to ``GATHERED_MAX_FFN``, else ``"fused_dgrad"`` up to
        ``FUSED_DGRAD_MAX_D_MODEL``, else ``"grouped"``."""
        if self.gemm != "auto":
            return self.gemm
        if ffn_dim <= GATHERED_MAX_FFN:
            return "gathered"
        return "fused_dgrad" if d_model <= FUSED_DGRAD_MAX_D_MODEL else "grouped"

    def capacity(self, num_tokens: int, num_experts: int) -> int:
        """Assignments each expert keeps in capacity mode: ``ceil(cf * N * top_k / E)``, at most N
        (an expert gets at most one assignment per token, so a larger capacity changes nothing)."""
        if self.capacity_factor * self.top_k >= num_experts:
            return num_tokens
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / num_experts)

    def heuristic_max_tokens(self, num_tokens: int, num_experts: int) -> int:
        """The seed's padded-layout size: mean load + 100%, never more than N."""
        return max(1, min(num_tokens, 2 * math.ceil(num_tokens * self.top_k / num_experts)))


OPTION_NAMES = tuple(f.name for f in fields(MoEOptions))


def signature_with_options(fn, exclude: tuple[str, ...] = ("top_k",)):
    """Lists ``MoEOptions``' fields in the signature of ``fn(..., **options)`` (for ``help()`` and
    IDEs), as keyword-only parameters with their defaults. Returns ``fn``."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    own = {p.name for p in params} | set(exclude)
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(MoEOptions) if f.name not in own]
    fn.__signature__ = sig.replace(parameters=params)
    return fn


# ``make_options``' results by arguments: a training loop passes the same ones every step, and
# validating them costs host time on the critical path of a host-bound step. MoEOptions is frozen.
_made_options: dict[tuple, MoEOptions] = {}


def make_options(top_k, options: dict, caller: str) -> MoEOptions:
    """``MoEOptions(top_k=top_k, **options)``; an unknown name is a ``TypeError`` naming ``caller``."""
    try:  # each value with its type: True and 1 are equal keys, but only one is a valid option
        key = (type(top_k), top_k, *((name, type(v), v) for name, v in options.items()))
        made = _made_options.get(key)
    except TypeError:  # an unhashable value (MoEOptions rejects it below)
        key = made = None
    if made is not None:
        return made
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; its options are "
                        f"{OPTION_NAMES[1:]}")
    made = MoEOptions(top_k=top_k, **options)
    if key is not None:
        if len(_made_options) >= 256:
            _made_options.clear()
        _made_options[key] = made
    return made


@dataclass(frozen=True)
class LayerConfig:
    """The hyperparameters of ``MoELayer`` and of its Flax twins, checked on construction.

    ``d_model`` D, ``ffn_dim`` F, ``num_experts`` E and the routed experts' ``options``; a shared
    dense GLU expert of width ``shared_ffn_dim`` (default ``ffn_dim * num_shared_experts``) when
    ``num_shared_experts >= 1``, gated by ``sigmoid(x @ shared_gate_weight.T)`` with
    ``shared_expert_gate``; ``use_expert_bias``: an fp32 selection bias ``[E]`` (state, not trained).
    """

    d_model: int
    ffn_dim: int
    num_experts: int
    options: MoEOptions
    use_expert_bias: bool = False
    num_shared_experts: int = 0
    shared_ffn_dim: int | None = None
    shared_expert_gate: bool = False

    def __post_init__(self):
        check_layer_args(self.d_model, self.ffn_dim, self.num_experts, self.num_shared_experts,
                         self.shared_ffn_dim, self.shared_expert_gate, self.use_expert_bias)
        self.options.check_num_experts(self.num_experts)

    @classmethod
    def from_kwargs(cls, d_model, ffn_dim, num_experts, top_k, caller: str, **kwargs) -> LayerConfig:
        """From a layer constructor's flat keyword arguments: layer fields and ``MoEOptions`` fields."""
        layer_names = {f.name for f in fields(cls)} - {"options"}
        layer = {k: v for k, v in kwargs.items() if k in layer_names}
        options = make_options(top_k, {k: v for k, v in kwargs.items() if k not in layer_names}, caller)
        return cls(d_model, ffn_dim, num_experts, options, **layer)

    def kwargs(self) -> dict:
        """The flat keyword arguments that ``from_kwargs`` takes (``caller`` aside)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**flat, **{name: getattr(self.options, name) for name in OPTION_NAMES}}

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


def layer_fields() -> list[tuple[str, str, object]]:
    """``(name, annotation, default)`` of every layer keyword argument after ``top_k``: the layer's
    own fields, then the options (the Linen module declares its fields from this)."""
    own = [(f.name, f.type, f.default) for f in fields(LayerConfig) if f.name not in
           ("d_model", "ffn_dim", "num_experts", "options")]
    return own + [(f.name, f.type, f.default) for f in fields(MoEOptions) if f.name != "top_k"]


def check_layer_args(d_model, ffn_dim, num_experts, num_shared_experts, shared_ffn_dim,
                     shared_expert_gate, use_expert_bias) -> None:
    """Checks the layer-level hyperparameters of ``MoELayer`` (and of the Flax modules)."""
    check_bool("use_expert_bias", use_expert_bias)
    check_bool("shared_expert_gate", shared_expert_gate)
    for name, value in (("d_model", d_model), ("ffn_dim", ffn_dim), ("num_experts", num_experts)):
        check_int(name, value, minimum=1)
    check_int("num_shared_experts", num_shared_experts, minimum=0)
    if shared_ffn_dim is not None:
        check_int("shared_ffn_dim", shared_ffn_dim, minimum=1)
        if num_shared_experts == 0:
            raise ValueError(f"shared_ffn_dim={shared_ffn_dim} given but num_shared_experts=0")
    if shared_expert_gate and num_shared_experts == 0:
        raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")


def dtype_name(dtype) -> str:
    """``"float32"`` for ``torch.float32``: the name torch, numpy and ``jax.numpy`` share."""
    return str(dtype).removeprefix("torch.")


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype torch autocast casts to on ``x``'s device, or None where it is off."""
    if not isinstance(x, torch.Tensor) or x.device.type == "meta":
        return None
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {dtype_name(t.dtype)}, device {t.device}"


def _check_float_tensors(named: dict) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            allowed = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
            raise TypeError(f"{name} must have a floating dtype in ({allowed}), got {dtype_name(t.dtype)}")


def _check_x_rank(x_name: str, x) -> None:
    if x.dim() < 1:
        raise ValueError(f"{x_name} must be [..., D] with at least one dimension, got {_describe(x)}")


def _check_rank(name: str, t, rank: int) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got {_describe(t)}")


def _names(names: list) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _agreed_dim(dim: str, entries: list) -> int:
    """The size of dimension ``dim`` that every tensor of ``entries`` gives, else a ValueError.

    ``entries``: ``(name, tensor, size, layout)``, x first; ``layout`` spells the tensor's shape
    with ``{D}``-style fields (``"[E, {D}]"``). The error names the tensor whose size disagrees
    with all the others' when there is one; otherwise the first that disagrees with the first.
    """
    sizes = [size for _, _, size, _ in entries]
    if len(set(sizes)) == 1:
        return sizes[0]
    odd = [i for i in range(len(entries)) if len({s for j, s in enumerate(sizes) if j != i}) == 1]
    if len(entries) > 2 and len(odd) == 1:
        bad, refs = odd[0], [j for j in range(len(entries)) if j != odd[0]]
    else:
        bad, refs = next(i for i, s in enumerate(sizes) if s != sizes[0]), [0]
    name, t, size, layout = entries[bad]
    agreed = sizes[refs[0]]
    verb = "has" if len(refs) == 1 else "have"
    fields = {"D": "D", "E": "E", "F": "F", dim: f"{dim}={agreed}"}
    raise ValueError(
        f"{name} has {dim}={size} but {_names([entries[j][0] for j in refs])} {verb} {dim}={agreed}: "
        f"{name} must be {layout.format(**fields)}, got {_describe(t)}"
    )


def _router_dims(x, router_weight, x_name: str = "x") -> tuple[int, int]:
    """``(D, E)`` of ``x [..., D]`` and a rank-2 ``router_weight [E, D]``."""
    _check_rank("router_weight", router_weight, 2)
    D = _agreed_dim("D", [(x_name, x, x.shape[-1], "[..., {D}]"),
                          ("router_weight", router_weight, router_weight.shape[1], "[{E}, {D}]")])
    return D, router_weight.shape[0]


def _check_same_device_and_dtype(named: dict, autocast: bool) -> None:
    """Every tensor on the first's device and (unless autocast casts them all) of its dtype."""
    x_name, x = next(iter(named.items()))
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(
                f"{name} is on {t.device} but {x_name} is on {x.device}; all must share a device"
            )
        if t.dtype != x.dtype and not autocast:
            raise TypeError(f"{name} has dtype {dtype_name(t.dtype)} but {x_name} has {dtype_name(x.dtype)}; "
                            "all must share a dtype")


def _check_expert_bias(expert_bias, E: int, x_name: str, device) -> None:
    if expert_bias is None:
        return
    if not isinstance(expert_bias, torch.Tensor):
        raise TypeError(f"expert_bias must be a torch.Tensor or None, got {type(expert_bias).__name__}")
    if tuple(expert_bias.shape) != (E,):
        raise ValueError(f"expert_bias must be [E={E}], got {_describe(expert_bias)}")
    if expert_bias.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"expert_bias must be float32 or float64, got {dtype_name(expert_bias.dtype)}")
    if expert_bias.device != device:
        raise ValueError(f"expert_bias is on {expert_bias.device} but {x_name} is on {device}")


def validate_inputs(x, router_weight, w_up, w_down, expert_bias, options: MoEOptions, *, autocast=False):
    """Checks tensor types, ranks, shapes, dtypes and devices. Returns ``(D, E, F)``.

    ``autocast``: torch autocast is on and will cast all four tensors to its dtype, so theirs may differ.
    """
    named = {"x": x, "router_weight": router_weight, "w_up": w_up, "w_down": w_down}
    _check_float_tensors(named)
    _check_x_rank("x", x)
    for name, rank in (("router_weight", 2), ("w_up", 3), ("w_down", 3)):
        _check_rank(name, named[name], rank)
    D, E, F = x.shape[-1], router_weight.shape[0], w_down.shape[2]
    if not (router_weight.shape[1] == w_up.shape[2] == w_down.shape[1] == D
            and w_up.shape[0] == w_down.shape[0] == E and w_up.shape[1] == 2 * F):
        D, E, F = _agreed_dims(x, router_weight, w_up, w_down)
    if E < 1 or D < 1 or F < 1:
        raise ValueError(f"E={E}, D={D} and F={F} must all be >= 1")
    _check_same_device_and_dtype(named, autocast)
    _check_expert_bias(expert_bias, E, "x", x.device)
    options.check_num_experts(E)
    return D, E, F


def _agreed_dims(x, router_weight, w_up, w_down) -> tuple[int, int, int]:
    """``(D, E, F)`` from the four tensors' shapes; a size they disagree on raises the ValueError
    that names the odd tensor."""
    # Each size from every tensor that has it, x first: the error names the one that disagrees.
    D = _agreed_dim("D", [("x", x, x.shape[-1], "[..., {D}]"),
                          ("router_weight", router_weight, router_weight.shape[1], "[{E}, {D}]"),
                          ("w_up", w_up, w_up.shape[2], "[{E}, 2F, {D}]"),
                          ("w_down", w_down, w_down.shape[1], "[{E}, {D}, {F}]")])
    E = _agreed_dim("E", [("router_weight", router_weight, router_weight.shape[0], "[{E}, {D}]"),
                          ("w_up", w_up, w_up.shape[0], "[{E}, 2F, {D}]"),
                          ("w_down", w_down, w_down.shape[0], "[{E}, {D}, {F}]")])
    if w_up.shape[1] % 2:
        raise ValueError(f"w_up must have an even number of rows (gate and up halves), got {w_up.shape[1]}")
    F = _agreed_dim("F", [("w_up", w_up, w_up.shape[1] // 2, "[{E}, 2*{F}, {D}]"),
                          ("w_down", w_down, w_down.shape[2], "[{E}, {D}, {F}]")])
    return D, E, F


def validate_router_inputs(x, router_weight, expert_bias, options: MoEOptions, *, x_name="x",
                           autocast=False):
    """``validate_inputs``' checks of what routing alone reads (``calibrate_max_tokens``).
    Returns ``(D, E)``."""
    named = {x_name: x, "router_weight": router_weight}
    _check_float_tensors(named)
    _check_x_rank(x_name, x)
    D, E = _router_dims(x, router_weight, x_name)
    if E < 1 or D < 1:
        raise ValueError(f"E={E} and D={D} must both be >= 1")
    _check_same_device_and_dtype(named, autocast)
    _check_expert_bias(expert_bias, E, x_name, x.device)
    options.check_num_experts(E)
    return D, E


def check_has_data(name: str, t: torch.Tensor) -> None:
    """The fused kernels read real memory: a ``meta`` tensor (shapes only) can't run."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no data; pass cpu or cuda tensors")


def check_aux_shapes(logits_shape: tuple, tokens_shape: tuple, score_func) -> None:
    """``aux_losses``' arguments: logits ``[N, E]``, tokens_per_expert ``[E]``, a known score_func."""
    _check_choice("score_func", score_func, SCORE_FUNCS)
    if len(logits_shape) != 2 or logits_shape[1] < 1:
        raise ValueError(f"logits must be [N, E] with E >= 1, got shape {logits_shape}")
    if tokens_shape != (logits_shape[1],):
        raise ValueError(f"tokens_per_expert must be [E={logits_shape[1]}], got shape {tokens_shape}")


def check_bias_update_args(bias_shape: tuple, bias_dtype: str, tokens_shape: tuple, rate) -> None:
    """``update_expert_bias``' arguments: ``expert_bias`` ``[E]`` float32/float64, ``tokens_per_expert``
    ``[E]``, ``rate`` a finite float > 0 (dtype names as ``dtype_name`` gives them)."""
    if len(bias_shape) != 1 or bias_shape[0] < 1:
        raise ValueError(f"expert_bias must be [E] with E >= 1, got shape {bias_shape}")
    if bias_dtype not in ("float32", "float64"):
        raise TypeError(f"expert_bias must be float32 or float64, got {bias_dtype}")
    if tokens_shape != bias_shape:
        raise ValueError(
            f"tokens_per_expert must be [E={bias_shape[0]}] like expert_bias, got shape {tokens_shape}"
        )
    check_finite("rate", rate)


def _check_tensors_and_loads(named: dict) -> None:
    """Every entry a torch.Tensor, ``named["tokens_per_expert"]`` integer or floating, and all on
    the first entry's device (checked by the caller after the shapes)."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    loads = named["tokens_per_expert"]
    if loads.is_complex() or loads.dtype == torch.bool:
        raise TypeError(f"tokens_per_expert must be integer or floating, got {loads.dtype}")


def _check_loads_device(tokens_per_expert, other_name: str, other) -> None:
    if tokens_per_expert.device != other.device:
        raise ValueError(
            f"tokens_per_expert is on {tokens_per_expert.device} but {other_name} is on {other.device}"
        )


def validate_aux_inputs(logits, tokens_per_expert, score_func) -> None:
    """Checks the arguments of ``aux_losses``."""
    _check_tensors_and_loads({"logits": logits, "tokens_per_expert": tokens_per_expert})
    if not logits.is_floating_point():
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
    check_aux_shapes(tuple(logits.shape), tuple(tokens_per_expert.shape), score_func)
    _check_loads_device(tokens_per_expert, "logits", logits)


def validate_bias_update_inputs(expert_bias, tokens_per_expert, rate) -> None:
    """Checks the arguments of ``update_expert_bias``."""
    _check_tensors_and_loads({"expert_bias": expert_bias, "tokens_per_expert": tokens_per_expert})
    check_bias_update_args(tuple(expert_bias.shape), dtype_name(expert_bias.dtype),
                           tuple(tokens_per_expert.shape), rate)
    _check_loads_device(tokens_per_expert, "expert_bias", expert_bias)
