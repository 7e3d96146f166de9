"""k-means fit + full assignment: htd-toolkit's torch k-means against scikit-learn's MiniBatchKMeans.

Same synthetic embeddings (Gaussian tissue-type blobs of unequal sizes and spreads), same k; both
sides timed for fit plus assignment of every vector; inertia computed the same way on all of them.

    python benchmarks/cluster.py                       # 1,000,000 x 1,024, k = 100 (about 4 GB of RAM)
    python benchmarks/cluster.py --n 100000 --dim 256  # quick
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from htd_toolkit.clustering.kmeans import KMeans, assign


def synthetic_embeddings(n: int, dim: int, types: int, seed: int = 0) -> np.ndarray:
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
    return out


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    centroids = torch.from_numpy(np.asarray(centroids, np.float32))
    return float(assign(torch.from_numpy(x), centroids, exact_distances=True)[1].double().sum())


def run(n: int, dim: int, k: int, seed: int = 0) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    x = synthetic_embeddings(n, dim, k, seed)
    warm = x[: min(n, 20 * k)]  # warm-up both sides (thread pools, BLAS, bf16 probe), untimed
    KMeans(k=k, seed=seed).fit(warm).predict(warm)
    MiniBatchKMeans(n_clusters=k, random_state=seed, n_init="auto", batch_size=4096).fit(warm).predict(warm)
    start = time.perf_counter()
    ours = KMeans(k=k, seed=seed).fit(x)
    ours.predict(x)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    stock = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init="auto", batch_size=4096).fit(x)
    stock.predict(x)
    t_stock = time.perf_counter() - start
    row = {"n": n, "dim": dim, "k": k, "threads": torch.get_num_threads(),
           "ours_s": t_ours, "sklearn_minibatch_s": t_stock, "speedup": t_stock / t_ours,
           "ours_inertia": inertia(x, ours.centroids.cpu().numpy()), "sklearn_inertia": inertia(x, stock.cluster_centers_)}
    row["inertia_ratio"] = row["ours_inertia"] / row["sklearn_inertia"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    row = run(args.n, args.dim, args.k, args.seed)
    print(json.dumps(row))
    print(f"scikit-learn MiniBatchKMeans fit + assign : {row['sklearn_minibatch_s']:8.2f} s  inertia {row['sklearn_inertia']:.6g}")
    print(f"htd-toolkit k-means fit + assign          : {row['ours_s']:8.2f} s  inertia {row['ours_inertia']:.6g}")
    print(f"speedup {row['speedup']:.2f}x, inertia ratio {row['inertia_ratio']:.4f} (target ≥ 2x, ≤ 1.01)")


if __name__ == "__main__":
    main()
