"""A small MoE language model in Flax NNX on ``jax_bridge.nnx.FusedMoE``, trained with optax.

    python examples/flax_train.py                     # tiny default: about 15 s on a 2-core CPU
    python examples/flax_train.py --init-from-torch   # start from torch_train.py's initial weights
    python examples/flax_train.py --steps 1000 --d-model 256 --layers 4 --experts 8 --vocab 512

The twin of ``examples/torch_train.py``: the same synthetic Markov-chain data (same seeds,
same batches), model, initialisation scales, loss and AdamW settings, so the loss falls the
same way from about ln(vocab) towards the chain's entropy rate ("floor"). With
``--init-from-torch`` it starts from the torch example's exact initial weights (same
``--seed``), and the two loss curves then agree step by step to float32 rounding. The MoE
layers run the fused torch kernels through the JAX bridge, inside one ``nnx.jit``-compiled
train step. Run it from the repository root (``PYTHONPATH=.`` unless the package is installed).
"""

from __future__ import annotations

import os

# torch (inside the bridge) and JAX share the GPU: keep JAX from taking 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from synthetic_data import example_arguments, markov_chain, sample_batches  # noqa: E402

from jax_bridge.convert import load_torch_state_dict_into_nnx, torch_to_numpy  # noqa: E402
from jax_bridge.nnx import FusedMoE  # noqa: E402


def parse_args(argv=None):
    p = example_arguments(__doc__.splitlines()[0])
    p.add_argument(
        "--init-from-torch",
        action="store_true",
        help="start from the initial weights of examples/torch_train.py (same --seed)",
    )
    return p.parse_args(argv)


# ---- model -------------------------------------------------------------------------------------

# torch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Block(nnx.Module):
    """x + attn(norm(x)), then + moe(norm(x)); returns the block output and its load-balance loss."""

    def __init__(self, args, rngs: nnx.Rngs):
        d = args.d_model
        self.heads = args.heads
        self.attn_norm = nnx.RMSNorm(d, epsilon=1e-6, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, kernel_init=linear_init, rngs=rngs)
        self.proj = nnx.Linear(d, d, use_bias=False, kernel_init=linear_init, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(d, epsilon=1e-6, rngs=rngs)
        self.moe = FusedMoE(d, args.ffn_dim, args.experts, args.top_k, num_shared_experts=1, rngs=rngs)

    def __call__(self, x):
        B, T, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).reshape(B, T, 3, self.heads, d // self.heads)
        a = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
        x = x + self.proj(a.reshape(B, T, d))
        y, aux = self.moe(self.moe_norm(x), return_aux=True)
        return x + y, aux["load_balance_loss"]


class MoELM(nnx.Module):
    def __init__(self, args, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(args.vocab, args.d_model, embedding_init=normal, rngs=rngs)
        self.pos = nnx.Param(normal(rngs.params(), (args.seq_len, args.d_model)))
        self.blocks = nnx.List([Block(args, rngs) for _ in range(args.layers)])
        self.norm = nnx.RMSNorm(args.d_model, epsilon=1e-6, rngs=rngs)
        self.head = (
            nnx.Linear(args.d_model, args.vocab, use_bias=False, kernel_init=linear_init, rngs=rngs)
            if args.untied_head
            else None
        )

    def __call__(self, tokens):
        """tokens [B, T] -> (logits [B, T, V], summed load-balance loss)."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        balance = 0.0
        for block in self.blocks:
            x, lb = block(x)
            balance = balance + lb
        h = self.norm(x)
        logits = self.head(h) if self.head is not None else self.embed.attend(h)
        return logits, balance


def _set(variable, value) -> None:
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(f"shape mismatch: {tuple(value.shape)} into {tuple(variable.shape)}")
    variable[...] = jnp.asarray(value, variable.dtype)


def load_torch_state_dict(model: MoELM, state_dict) -> None:
    """Copies the weights of a ``torch_train.MoELM`` of the same sizes into ``model``, exactly."""
    get = lambda key: jnp.asarray(torch_to_numpy(state_dict[key]))
    _set(model.embed.embedding, get("embed.weight"))
    _set(model.pos, get("pos"))
    _set(model.norm.scale, get("norm.weight"))
    if model.head is not None:
        _set(model.head.kernel, get("head.weight").T)  # torch Linear [out, in], NNX [in, out]
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        _set(block.attn_norm.scale, get(prefix + "attn_norm.weight"))
        _set(block.qkv.kernel, get(prefix + "qkv.weight").T)
        _set(block.proj.kernel, get(prefix + "proj.weight").T)
        _set(block.moe_norm.scale, get(prefix + "moe_norm.weight"))
        load_torch_state_dict_into_nnx(block.moe, state_dict, prefix=prefix + "moe.")


def torch_initial_weights(args) -> dict:
    """The initial ``state_dict`` of ``examples/torch_train.py`` for these arguments."""
    import torch
    import torch_train  # the sibling example: this file's directory is on sys.path when run as a script

    torch.manual_seed(args.seed)
    return torch_train.MoELM(args).state_dict()


@nnx.jit(static_argnames="aux_coef")
def train_step(model, optimizer, seq, aux_coef):
    def loss_fn(model):
        logits, balance = model(seq[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), seq[:, 1:]).mean()
        return ce + aux_coef * balance, ce

    (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return ce


def train(args, model: MoELM | None = None) -> list[float]:
    """Trains ``model`` (default: a fresh ``MoELM`` from ``--seed``, or the torch example's initial
    weights with ``--init-from-torch``); returns the loss of every step."""
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    probs, floor = markov_chain(args.vocab, args.branching, args.seed)
    batches = sample_batches(probs, args.batch_size, args.seq_len, args.seed + 1)
    if model is None:
        model = MoELM(args, nnx.Rngs(args.seed))
        if args.init_from_torch:
            load_torch_state_dict(model, torch_initial_weights(args))
    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"Flax NNX MoE LM: {n_params} parameters on {jax.devices()[0].platform}; "
        f"uniform loss {math.log(args.vocab):.3f}, floor {floor:.3f}"
    )
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        losses.append(float(train_step(model, optimizer, jnp.asarray(next(batches)), args.aux_coef)))
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")
    return losses


def main(argv=None) -> float:
    """Runs ``train`` and returns the final loss (cross-entropy of the last step)."""
    losses = train(parse_args(argv))
    print(f"final loss {losses[-1]:.4f}")
    return losses[-1]


if __name__ == "__main__":
    main(sys.argv[1:])
