"""Fréchet distance between two feature sets, computed in float64.

FD = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½. The trace of the matrix square root comes
from the eigenvalues of the symmetric PSD product Σ1^½ Σ2 Σ1^½ (negative round-off clipped), which
avoids the complex parts and failures of `scipy.linalg.sqrtm` on near-singular covariances.
"""

from __future__ import annotations

import numpy as np


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError("need at least two feature vectors to estimate a covariance")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt))


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance_from_stats(*statistics(features1), *statistics(features2))


def bootstrap_fd_difference(real: np.ndarray, first: np.ndarray, second: np.ndarray, resamples: int = 200,
                            seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """FD(real, first) − FD(real, second) and its bootstrap interval (percentile, all three sets resampled
    with replacement, the real resample shared by both sides): whether two settings' FDs differ by more
    than the sampling noise of sets this size."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        shared = real[rng.integers(len(real), size=len(real))]
        differences.append(frechet_distance(shared, first[rng.integers(len(first), size=len(first))])
                           - frechet_distance(shared, second[rng.integers(len(second), size=len(second))]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return frechet_distance(real, first) - frechet_distance(real, second), float(low), float(high)
