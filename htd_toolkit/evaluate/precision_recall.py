"""Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

Each set's manifold is the union of balls around its points, of radius the distance to the k-th
nearest neighbour in the same set. Precision: the share of synthetic points inside the real manifold;
recall: the share of real points inside the synthetic manifold.
"""

from __future__ import annotations

import numpy as np

from htd_toolkit.evaluate.neighbours import kth_neighbour_distance, mutual_ball_coverage


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int = 3) -> tuple[float, float]:
    return mutual_ball_coverage(real, synthetic, kth_neighbour_distance(real, k), kth_neighbour_distance(synthetic, k))
