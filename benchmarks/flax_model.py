"""The seed model of ``benchmarks.train`` in Flax NNX, with a choice of MoE layer.

Same architecture, parameter shapes and initialisation scales as ``benchmarks.train.Model``:
tied embeddings; pre-norm blocks of RMSNorm, RoPE causal attention
(``jax.nn.dot_product_attention``) and an FFN; layer 0 a dense SwiGLU FFN, layers 1..L-1 an
MoE (top-k softmax routing, one shared expert). Parameters are fp32. Matmuls run in ``dtype``
(bf16 on GPU, like torch's autocast); the residual stream, the norms and the loss stay fp32.

MoE layers (``moe=``), same parameters (the torch ``MoELayer`` names and layouts):

- ``"bridge"``: ``jax_bridge.nnx.FusedMoE``, the fused Triton kernels through the JAX bridge;
- ``"ragged_dot"``: ``RaggedDotMoE``, pure JAX (``jax_bridge.reference.ragged_dot_moe``:
  sort-based dispatch and ``lax.ragged_dot``).

The MoE blocks run under ``nnx.scan`` over stacked parameters (``scan=True``) or a Python
loop; ``remat=True`` wraps every block in ``nnx.remat``. ``load_torch_state_dict`` copies a
``benchmarks.train.Model`` ``state_dict`` in exactly (either layout).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flashfusemoe.config import layer_fields
from jax_bridge.convert import glu_mlp, torch_to_numpy
from jax_bridge.nnx import FusedMoE
from jax_bridge.reference import ragged_dot_moe

__all__ = [
    "MOE_LAYERS",
    "RaggedDotMoE",
    "SeedModel",
    "load_torch_state_dict",
    "param_count",
    "to_numpy_state_dict",
]

MOE_LAYERS = ("bridge", "ragged_dot")
ATTENTION = ("xla", "cudnn")
_normal = nnx.initializers.normal(0.02)


class RaggedDotMoE(FusedMoE):
    """``FusedMoE``'s parameters with a pure-JAX forward: ``ragged_dot_moe`` + the shared expert.

    Takes ``FusedMoE``'s arguments; only the options ``ragged_dot_moe`` implements (softmax,
    normalised top-k weights, dropless, ungated shared expert) may differ from the defaults.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fixed = (
            "score_func",
            "norm_topk_prob",
            "use_expert_bias",
            "n_group",
            "topk_group",
            "routed_scaling_factor",
            "capacity_factor",
            "gemm",
            "max_tokens_per_expert",
            "recompute",
            "shared_expert_gate",
        )
        given = self.config.kwargs()
        for name, _, default in layer_fields():
            if name in fixed and given[name] != default:
                raise ValueError(f"RaggedDotMoE supports only {name}={default!r}, got {given[name]!r}")

    def __call__(self, x, return_aux: bool = False):
        """x [..., D] -> out [..., D] (or ``(out, aux)``), computed in ``dtype`` as ``FusedMoE``."""
        p = self.params_dict()
        dtype = self.dtype or jnp.result_type(x.dtype, *(v.dtype for v in p.values()))
        x = jnp.asarray(x, dtype)
        w = {k: v.astype(dtype) for k, v in p.items()}
        c = self.config
        result = ragged_dot_moe(
            x,
            w["router_weight"],
            w["w_up"],
            w["w_down"],
            c.options.top_k,
            activation=c.options.activation,
            return_aux=return_aux,
        )
        out, aux = result if return_aux else (result, None)
        if c.num_shared_experts:
            out = out + glu_mlp(x, w["shared_w_up"], w["shared_w_down"], c.options.activation)
        return (out, aux) if return_aux else out


def rope_tables(seq: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, hd/2] (fp32), as ``benchmarks.train.Model``'s buffers."""
    inv = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = np.outer(np.arange(seq, dtype=np.float32), inv)
    return np.cos(angles), np.sin(angles)


def rope(x, cos, sin):
    """Rotary embedding on x [B, T, H, hd] with cos/sin [T, hd/2] (rotate-half convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = jnp.asarray(cos[:, None, :], x.dtype), jnp.asarray(sin[:, None, :], x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, dtype, implementation: str, *, rngs: nnx.Rngs):
        self.n_heads, self.implementation = n_heads, implementation
        linear = dict(use_bias=False, kernel_init=_normal, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, **linear)
        self.proj = nnx.Linear(d_model, d_model, **linear)

    def __call__(self, x, cos, sin):
        """x [B, T, D] -> [B, T, D] (causal)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.n_heads, D // self.n_heads)
        q, k, v = rope(qkv[:, :, 0], cos, sin), rope(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        return self.proj(y.reshape(B, T, D))


class DenseFFN(nnx.Module):
    """SwiGLU FFN with torch-layout weights ``up [2W, D]`` (gate rows first), ``down [D, W]``."""

    def __init__(self, d_model: int, width: int, dtype, *, rngs: nnx.Rngs):
        self.dtype = dtype
        self.up = nnx.Param(_normal(rngs.params(), (2 * width, d_model)))
        self.down = nnx.Param(_normal(rngs.params(), (d_model, width)))

    def __call__(self, x, return_aux: bool = False):
        dt = self.dtype
        out = glu_mlp(x.astype(dt), self.up[...].astype(dt), self.down[...].astype(dt), "swiglu")
        return (out, None) if return_aux else out


class Block(nnx.Module):
    """Pre-norm block; returns ``(x, load-balance loss or 0)``."""

    def __init__(self, cfg, ffn: nnx.Module, dtype, attention: str, *, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.attn = Attention(cfg.d_model, cfg.n_heads, dtype, attention, rngs=rngs)
        self.norm2 = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.ffn = ffn

    def __call__(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        y, aux = self.ffn(self.norm2(x), return_aux=True)
        balance = aux["load_balance_loss"] if aux is not None else jnp.zeros((), jnp.float32)
        return x + y, balance


class SeedModel(nnx.Module):
    """``benchmarks.train.Model`` in NNX. ``cfg``: a ``benchmarks.train.ModelConfig``.

    ``__call__(tokens [B, T], targets [B, T]) -> (mean cross-entropy, mean load-balance loss
    over the MoE layers)``, both fp32 scalars.
    """

    def __init__(
        self,
        cfg,
        moe: str = "bridge",
        *,
        scan: bool = True,
        remat: bool = False,
        dtype=jnp.bfloat16,
        attention: str = "xla",
        rngs: nnx.Rngs,
    ):
        if moe not in MOE_LAYERS:
            raise ValueError(f"moe must be one of {MOE_LAYERS}, got {moe!r}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if cfg.n_layers < 2:
            raise ValueError(
                f"cfg.n_layers must be >= 2 (a dense layer, then MoE layers), got {cfg.n_layers}"
            )
        if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(
                f"cfg.d_model={cfg.d_model} must split into n_heads={cfg.n_heads} even head dims"
            )
        self.cfg, self.scan, self.remat, self.dtype = cfg, scan, remat, dtype
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, embedding_init=_normal, rngs=rngs)
        self.dense = Block(
            cfg, DenseFFN(cfg.d_model, cfg.dense_ffn, dtype, rngs=rngs), dtype, attention, rngs=rngs
        )
        layer = FusedMoE if moe == "bridge" else RaggedDotMoE

        def make(rngs):
            ffn = layer(
                cfg.d_model,
                cfg.expert_ffn,
                cfg.n_experts,
                cfg.top_k,
                num_shared_experts=1,
                dtype=dtype,
                rngs=rngs,
            )
            return Block(cfg, ffn, dtype, attention, rngs=rngs)

        n_moe = cfg.n_layers - 1
        if scan:
            self.moe_blocks = nnx.split_rngs(splits=n_moe)(nnx.vmap(make, in_axes=0, out_axes=0))(rngs)
        else:
            self.moe_blocks = nnx.List([make(rngs) for _ in range(n_moe)])
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)

    def __call__(self, tokens, targets):
        cfg = self.cfg
        cos, sin = rope_tables(tokens.shape[1], cfg.d_model // cfg.n_heads)
        run = lambda block, x: block(x, cos, sin)
        if self.remat:
            run = nnx.remat(run)
        x, _ = run(self.dense, self.embed(tokens))
        if self.scan:
            body = nnx.scan(run, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
            x, balance = body(self.moe_blocks, x)
            balance = balance.sum()
        else:
            balance = 0.0
            for block in self.moe_blocks:
                x, b = run(block, x)
                balance = balance + b
        h = self.norm(x).astype(self.dtype)
        logits = h @ self.embed.embedding[...].astype(self.dtype).T  # tied unembedding
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
        return ce, balance / (cfg.n_layers - 1)


def param_count(model: SeedModel) -> int:
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _block_variables(block: Block) -> dict[str, tuple[nnx.Variable, bool]]:
    """``{name in the torch block: (variable, transposed)}``; torch Linear is [out, in], NNX [in, out]."""
    out = {
        "norm1.weight": (block.norm1.scale, False),
        "norm2.weight": (block.norm2.scale, False),
        "attn.qkv.weight": (block.attn.qkv.kernel, True),
        "attn.proj.weight": (block.attn.proj.kernel, True),
    }
    if isinstance(block.ffn, DenseFFN):
        out["ffn.up.weight"], out["ffn.down.weight"] = (block.ffn.up, False), (block.ffn.down, False)
    else:
        for name in block.ffn.params_dict():
            out[f"ffn.{name}"] = (getattr(block.ffn, name), False)
    return out


def _torch_names(model: SeedModel) -> list[tuple[nnx.Variable, bool, list[str], bool]]:
    """``(variable, transposed, torch names, stacked)`` for every parameter of ``model``.

    A scanned (stacked) variable holds its layers' entries along axis 0.
    """
    out = [
        (model.embed.embedding, False, ["embed.weight"], False),
        (model.norm.scale, False, ["head.norm.weight"], False),
    ]
    out += [(v, t, [f"blocks.0.{name}"], False) for name, (v, t) in _block_variables(model.dense).items()]
    n_moe = model.cfg.n_layers - 1
    if model.scan:
        for name, (v, t) in _block_variables(model.moe_blocks).items():
            out.append((v, t, [f"blocks.{i + 1}.{name}" for i in range(n_moe)], True))
    else:
        for i, block in enumerate(model.moe_blocks):
            out += [
                (v, t, [f"blocks.{i + 1}.{name}"], False) for name, (v, t) in _block_variables(block).items()
            ]
    return out


def load_torch_state_dict(model: SeedModel, state_dict: Mapping) -> None:
    """Copies a ``benchmarks.train.Model`` ``state_dict`` of the same config into ``model``, exactly.

    Every entry must be used and every parameter set; values are cast to the variables' dtypes.
    """
    targets = _torch_names(model)
    missing = [n for _, _, names, _ in targets for n in names if n not in state_dict]
    unused = sorted(set(state_dict) - {n for _, _, names, _ in targets for n in names})
    if missing or unused:
        raise ValueError(f"state_dict does not fit the model: missing {missing[:5]}, unused {unused[:5]}")
    for var, transposed, names, stacked in targets:
        arrays = [torch_to_numpy(state_dict[n]) for n in names]
        arrays = [a.T if transposed else a for a in arrays]
        value = np.stack(arrays) if stacked else arrays[0]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{names[0]}: shape {tuple(value.shape)} does not fit {tuple(var.shape)}")
        var[...] = jnp.asarray(value, var.dtype)


def to_numpy_state_dict(model: SeedModel) -> dict[str, np.ndarray]:
    """``{torch name: array}`` of ``model``'s parameters (torch layouts), the inverse of
    ``load_torch_state_dict``. On a model whose parameters hold gradients, the gradients."""
    out = {}
    for var, transposed, names, stacked in _torch_names(model):
        value = np.asarray(var[...])
        for i, name in enumerate(names):
            a = value[i] if stacked else value
            out[name] = a.T if transposed else a
    return out
