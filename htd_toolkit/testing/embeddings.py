"""Synthetic tissue-type embeddings for the k-means tests and benchmark: well-separated Gaussian types of
unequal sizes (Dirichlet weights) and spreads, like tiles of a few large and many small tissue types."""

from __future__ import annotations

import numpy as np


def tissue_type_embeddings(n: int, dim: int, types: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 vectors, the type each was drawn from), generated 100,000 rows at a time."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(types, dim)).astype(np.float32) * 2.0
    weights = rng.dirichlet(np.ones(types) * 2)
    spreads = rng.uniform(0.5, 1.5, types).astype(np.float32)
    labels = rng.choice(types, size=n, p=weights)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        part = labels[start:start + 100_000]
        out[start:start + len(part)] = centers[part] + rng.standard_normal((len(part), dim), np.float32) * \
            spreads[part, None]
    return out, labels


def partition_inertia(x: np.ndarray, labels: np.ndarray) -> float:
    """Squared error of the partition `labels` about its own means (float64), e.g. of the generating types:
    the inertia a k-means that found every type would reach."""
    types = int(labels.max()) + 1
    means = np.zeros((types, x.shape[1]))
    np.add.at(means, labels, x)
    means /= np.maximum(np.bincount(labels, minlength=types), 1)[:, None]
    total = 0.0
    for start in range(0, len(x), 100_000):
        rows = slice(start, start + 100_000)
        total += float(((x[rows] - means[labels[rows]]) ** 2).sum())
    return total
