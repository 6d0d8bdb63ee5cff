"""What examples/torch_train.py and examples/flax_train.py share: their command line, and the
synthetic training data (walks of a random sparse Markov chain, whose entropy rate is the loss
floor a model can reach)."""

import argparse

import numpy as np


def example_arguments(description: str) -> argparse.ArgumentParser:
    """The options both examples take (model size, data, optimiser, logging), same defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--branching", type=int, default=2, help="successors of each token in the chain")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--untied-head", action="store_true")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    return p


def markov_chain(vocab: int, branching: int, seed: int):
    """Transition matrix [V, V] with ``branching`` random successors per token, and its entropy rate."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((vocab, vocab))
    for token in range(vocab):
        successors = rng.choice(vocab, size=branching, replace=False)
        probs[token, successors] = rng.dirichlet(np.ones(branching))
    # Stationary distribution: the eigenvector of probs.T for eigenvalue 1.
    values, vectors = np.linalg.eig(probs.T)
    pi = np.abs(np.real(vectors[:, np.argmin(np.abs(values - 1))]))
    pi /= pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
    return probs, float(pi @ row_entropy)


def sample_batches(probs, batch_size: int, seq_len: int, seed: int):
    """Endless int32 batches [B, seq_len + 1] of chain walks from uniform random starts."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(probs, axis=1)
    vocab = probs.shape[0]
    while True:
        seq = np.empty((batch_size, seq_len + 1), np.int32)
        seq[:, 0] = rng.integers(vocab, size=batch_size)
        for t in range(seq_len):
            u = rng.random(batch_size)[:, None]
            seq[:, t + 1] = np.minimum((cumulative[seq[:, t]] < u).sum(axis=1), vocab - 1)
        yield seq
