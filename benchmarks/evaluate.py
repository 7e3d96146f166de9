"""Evaluation metrics at dataset scale: htd-toolkit against the reference implementations, in one run.

- Precision/recall (k-NN manifolds, k = 3): `prdc` (NAVER's reference code: three full float32
  distance matrices, `argpartition`) against `htd_toolkit.evaluate.neighbours` (float64, blocks of
  rows reduced at once: memory grows with one block, not with N·M).
- Fréchet distance from the statistics: pytorch-fid's `calculate_frechet_distance`
  (`scipy.linalg.sqrtm` of Σ1Σ2) against ours (two symmetric eigendecompositions).
- Nearest real image of every synthetic one (the memorization audit): scikit-learn's brute-force
  `NearestNeighbors` against ours.

Features are a Gaussian mixture (synthetic drawn from most, not all, of the real clusters, shifted a
little) so precision and recall are neither 0 nor 1. Values are printed beside the timings.

    python benchmarks/evaluate.py                      # 10,000 × 1,024 per set, about 2 minutes on 2 cores
    python benchmarks/evaluate.py --n 2000 --dim 256   # seconds
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def feature_sets(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim)) * 4 / np.sqrt(dim) * 3
    real = centres[rng.integers(0, 50, n)] + rng.normal(size=(n, dim)) / np.sqrt(dim) * 3
    shifted = centres[:40] + rng.normal(size=(40, dim)) / np.sqrt(dim) * 0.3
    synthetic = shifted[rng.integers(0, 40, n)] + rng.normal(size=(n, dim)) / np.sqrt(dim) * 3
    return real.astype(np.float32), synthetic.astype(np.float32)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def precision_recall_row(real: np.ndarray, synthetic: np.ndarray, k: int = 3) -> dict:
    from prdc.prdc import compute_nearest_neighbour_distances, compute_pairwise_distance

    from htd_toolkit.evaluate.precision_recall import precision_recall

    def reference():
        across = compute_pairwise_distance(real, synthetic)
        precision = (across < compute_nearest_neighbour_distances(real, k)[:, None]).any(axis=0).mean()
        recall = (across < compute_nearest_neighbour_distances(synthetic, k)[None, :]).any(axis=1).mean()
        return float(precision), float(recall)

    ours, t_ours = timed(lambda: precision_recall(real, synthetic, k))
    stock, t_stock = timed(reference)
    matrices = (len(real) ** 2 + len(synthetic) ** 2 + len(real) * len(synthetic)) * 4 / 2**30
    return {"metric": "precision/recall", "stock": "prdc 0.2", "stock_s": t_stock, "ours_s": t_ours,
            "speedup": t_stock / t_ours, "stock_values": stock, "ours_values": ours,
            "stock_matrices_GiB": round(matrices, 2)}


def frechet_row(real: np.ndarray, synthetic: np.ndarray) -> dict:
    from pytorch_fid.fid_score import calculate_frechet_distance

    from htd_toolkit.evaluate.fd import frechet_distance_from_stats, statistics

    stats = (*statistics(real), *statistics(synthetic))
    ours, t_ours = timed(lambda: frechet_distance_from_stats(*stats))
    stock, t_stock = timed(lambda: float(calculate_frechet_distance(*stats)))
    return {"metric": "Fréchet distance (from statistics)", "stock": "pytorch-fid 0.3", "stock_s": t_stock,
            "ours_s": t_ours, "speedup": t_stock / t_ours, "stock_values": stock, "ours_values": ours}


def nearest_row(real: np.ndarray, synthetic: np.ndarray) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from htd_toolkit.evaluate.neighbours import nearest

    def reference():
        distance, index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(real).kneighbors(synthetic)
        return distance[:, 0], index[:, 0]

    (ours_d, ours_i), t_ours = timed(lambda: nearest(synthetic, real))
    (stock_d, stock_i), t_stock = timed(reference)
    return {"metric": "nearest real image (memorization)", "stock": "scikit-learn NearestNeighbors (brute)",
            "stock_s": t_stock, "ours_s": t_ours, "speedup": t_stock / t_ours,
            "same_neighbour": float(np.mean(ours_i == stock_i)),
            "max_distance_diff": float(np.abs(ours_d - stock_d).max())}


def run(n: int, dim: int, fd_dim: int) -> list[dict]:
    real, synthetic = feature_sets(n, dim)
    rows = [precision_recall_row(real, synthetic), nearest_row(real, synthetic)]
    rows.append(frechet_row(*feature_sets(n, fd_dim, seed=1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="vectors per set")
    parser.add_argument("--dim", type=int, default=1024, help="feature size for the neighbour metrics")
    parser.add_argument("--fd-dim", type=int, default=2048, help="feature size for FD (Inception's is 2048)")
    args = parser.parse_args()
    for row in run(args.n, args.dim, args.fd_dim):
        print(json.dumps(row))
        print(f"{row['metric']}: {row['stock']} {row['stock_s']:.2f} s, ours {row['ours_s']:.2f} s, "
              f"ratio {row['speedup']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
