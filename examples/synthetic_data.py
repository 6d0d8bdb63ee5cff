"""Synthetic training data shared by examples/torch_train.py and examples/flax_train.py: walks
of a random sparse Markov chain, whose entropy rate is the loss floor a model can reach."""

import numpy as np


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
