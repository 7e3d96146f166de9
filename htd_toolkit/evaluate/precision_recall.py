"""Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

Each set's manifold is the union of balls around its points, of radius the distance to the k-th
nearest neighbour in the same set. Precision: the share of synthetic points inside the real manifold;
recall: the share of real points inside the synthetic manifold.
"""

from __future__ import annotations

import numpy as np
import torch


def pairwise(a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    x, y = torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))
    return torch.cat([torch.cdist(x[i:i + chunk], y) for i in range(0, len(x), chunk)]).numpy()


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    distances = pairwise(features, features)
    k = min(k, len(features) - 1)
    return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself


def coverage(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray) -> float:
    return float((pairwise(points, manifold) <= radii[None, :]).any(axis=1).mean())


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int = 3) -> tuple[float, float]:
    return (coverage(synthetic, real, knn_radii(real, k)), coverage(real, synthetic, knn_radii(synthetic, k)))
