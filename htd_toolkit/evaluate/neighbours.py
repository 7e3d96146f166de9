"""Euclidean neighbour queries over feature sets, in blocks of rows, exact where values are reported.

Precision/recall and the memorization audit need, for tens of thousands of vectors, the k-th
neighbour distance within a set, whether a point lies in any ball of another set, and the nearest
point of another set. A full N × M distance matrix (what `prdc` builds, three times) needs N·M·4
bytes, 10 GB at 50,000 × 50,000, and sorting its rows costs N·M·log M. Here distances are computed
`block` rows at a time on the compute device and reduced at once (top-k, any, min), so memory is
block · M and no row is sorted. The search runs in float32 (the matrix-product form, fast on every
GPU and CPU); the distances it returns are recomputed in float64 for the neighbours it found, so a
copy is at distance 0, not at float32 round-off.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from htd_toolkit.config import compute_device

BLOCK = 1024


def _tensor(features: np.ndarray, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features), device=device).to(dtype)


def _exact(query: torch.Tensor, reference: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Distances from each query row to its candidate reference rows `index` (rows × candidates)."""
    return torch.linalg.vector_norm(query.unsqueeze(1) - reference[index], dim=-1)


def _blocks(query: torch.Tensor, reference: torch.Tensor, block: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(query), block):
        yield start, torch.cdist(query[start:start + block], reference)


def kth_neighbour_distance(features: np.ndarray, k: int, block: int = BLOCK) -> np.ndarray:
    """Distance from each vector to its k-th nearest other vector of the same set."""
    device = compute_device()
    x, exact = _tensor(features, device), _tensor(features, device, torch.float64)
    k = min(k, len(x) - 1)
    radii = []
    for start, d in _blocks(x, x, block):
        # the point itself is among the k + 1 nearest (distance 0), so the (k + 1)-th is its k-th neighbour
        index = torch.topk(d, k + 1, dim=1, largest=False).indices
        rows = exact[start:start + len(d)]
        radii.append(torch.sort(_exact(rows, exact, index), dim=1).values[:, k])
    return torch.cat(radii).cpu().numpy()


def mutual_ball_coverage(a: np.ndarray, b: np.ndarray, radii_a: np.ndarray, radii_b: np.ndarray,
                         block: int = BLOCK) -> tuple[float, float]:
    """(share of b within radii_a[i] of some a[i], share of a within radii_b[j] of some b[j]), both from
    one pass over the a × b distances."""
    device = compute_device()
    x, y = _tensor(a, device), _tensor(b, device)
    ra, rb = _tensor(radii_a, device), _tensor(radii_b, device)  # compared in float32, as prdc does
    b_covered = torch.zeros(len(y), dtype=torch.bool, device=device)
    a_covered = []
    for start, d in _blocks(x, y, block):
        b_covered |= (d <= ra[start:start + len(d), None]).any(dim=0)
        a_covered.append((d <= rb[None, :]).any(dim=1))
    return float(b_covered.double().mean()), float(torch.cat(a_covered).double().mean())


def nearest(query: np.ndarray, reference: np.ndarray, exclude_self: bool = False,
            block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, the nearest reference vector; `exclude_self` when both are the same set."""
    device = compute_device()
    q, ref = _tensor(query, device), _tensor(reference, device)
    q64, ref64 = _tensor(query, device, torch.float64), _tensor(reference, device, torch.float64)
    distances, indices = [], []
    for start, d in _blocks(q, ref, block):
        if exclude_self:
            rows = torch.arange(len(d), device=device)
            d[rows, rows + start] = torch.inf
        index = d.argmin(dim=1)
        distances.append(_exact(q64[start:start + len(d)], ref64, index[:, None])[:, 0])
        indices.append(index)
    return torch.cat(distances).cpu().numpy(), torch.cat(indices).cpu().numpy()
