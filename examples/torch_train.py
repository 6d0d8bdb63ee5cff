"""A small MoE language model in PyTorch on ``flashfusemoe.MoELayer``, trained on synthetic data.

    python examples/torch_train.py                    # tiny default: about 5 s on a 2-core CPU
    python examples/torch_train.py --steps 1000 --d-model 256 --layers 4 --experts 8 --vocab 512

The default is tiny: d_model 32, 2 layers, 4 experts, top-2, vocab 64, 16 x 32 tokens a step,
300 steps, the loss going from 4.2 to about 0.5. The data is a random first-order Markov chain
over ``--vocab`` tokens in which every token has ``--branching`` possible successors, so the
best achievable loss is the chain's entropy rate (printed as "floor"); the loss falls from
about ln(vocab) towards it. The model: token and position embeddings, ``--layers`` pre-norm
blocks (RMSNorm, causal multi-head attention, RMSNorm, MoE layer with one shared expert), a
final RMSNorm and an LM head tied to the token embedding (``--untied-head`` for a separate
one); loss = cross-entropy + ``--aux-coef`` times the summed load-balance losses; AdamW.
``examples/flax_train.py`` is the same model, data and optimiser in Flax NNX on
``jax_bridge.nnx.FusedMoE``: the two losses fall the same way. Run it from the repository root
(``PYTHONPATH=.`` unless the package is installed).
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from synthetic_data import example_arguments, markov_chain, sample_batches
from torch import nn

import flashfusemoe


def parse_args(argv=None):
    return example_arguments(__doc__.splitlines()[0]).parse_args(argv)


# ---- model -------------------------------------------------------------------------------------


class Block(nn.Module):
    """x + attn(norm(x)), then + moe(norm(x)); returns the block output and its load-balance loss."""

    def __init__(self, args):
        super().__init__()
        d = args.d_model
        self.heads = args.heads
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe_norm = nn.RMSNorm(d, eps=1e-6)
        self.moe = flashfusemoe.MoELayer(d, args.ffn_dim, args.experts, args.top_k, num_shared_experts=1)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        y, aux = self.moe(self.moe_norm(x), return_aux=True)
        return x + y, aux["load_balance_loss"]


class MoELM(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.d_model)
        self.pos = nn.Parameter(torch.empty(args.seq_len, args.d_model))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.layers))
        self.norm = nn.RMSNorm(args.d_model, eps=1e-6)
        self.head = nn.Linear(args.d_model, args.vocab, bias=False) if args.untied_head else None

    def forward(self, tokens):
        """tokens [B, T] -> (logits [B, T, V], summed load-balance loss)."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        balance = 0.0
        for block in self.blocks:
            x, lb = block(x)
            balance = balance + lb
        h = self.norm(x)
        logits = self.head(h) if self.head is not None else h @ self.embed.weight.T
        return logits, balance


def train(args, model: MoELM | None = None) -> list[float]:
    """Trains ``model`` (default: a fresh ``MoELM`` from ``--seed``); returns the loss of every step."""
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    probs, floor = markov_chain(args.vocab, args.branching, args.seed)
    batches = sample_batches(probs, args.batch_size, args.seq_len, args.seed + 1)
    model = (model or MoELM(args)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torch MoE LM: {n_params} parameters on {device}; uniform loss {math.log(args.vocab):.3f}, "
        f"floor {floor:.3f}"
    )
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        seq = torch.from_numpy(next(batches)).long().to(device)
        logits, balance = model(seq[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, args.vocab).float(), seq[:, 1:].reshape(-1))
        loss = ce + args.aux_coef * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(ce.item())
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
