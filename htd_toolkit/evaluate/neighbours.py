"""Euclidean neighbour queries over feature sets, in blocks of rows, with float64-exact answers.

Precision/recall and the memorization audit need, for tens of thousands of vectors, the k-th
neighbour distance within a set, whether a point lies in any ball of another set, and the nearest
point of another set. A full N × M distance matrix (what `prdc` builds, three times) needs N·M·4
bytes, 10 GB at 50,000 × 50,000, and sorting its rows costs N·M·log M. Here distances are computed
`block` rows at a time on the compute device and reduced at once (top-k, any, min), so memory is
block · M and no row is sorted.

The search runs in float32 (the matrix-product form, fast on every GPU and CPU), whose squared
distances are off by up to a small multiple of eps·(|q|² + |r|²). Every answer is settled in
float64 instead: the float32 search only proposes candidates, and wherever a float32 distance is
within that error bound of a decision (the k nearest, a ball's radius) the pair is recomputed as the
norm of the float64 difference. So an exact copy is always at distance 0 and is always the nearest,
and ball membership equals a float64 brute force (strictly inside, as `prdc` decides).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from htd_toolkit.config import compute_device

BLOCK = 1024
EXTRA_CANDIDATES = 4  # float32 candidates re-ranked in float64 beyond the k asked for
FLOAT32_ERROR = 8 * float(np.finfo(np.float32).eps)  # × sqrt(dim) × (|q|² + |r|²): ≥ 10× the error measured


class _Set:
    """A feature set on the compute device, in float32 for the search and float64 for the answers."""

    def __init__(self, features: np.ndarray, device: torch.device):
        self.exact = torch.as_tensor(np.asarray(features), device=device).to(torch.float64)
        self.fast = self.exact.float()
        self.norm2 = (self.exact ** 2).sum(dim=1)
        self.fast_norm2 = self.norm2.float()

    def __len__(self) -> int:
        return len(self.exact)


def _slack(query: _Set, reference: _Set, start: int, rows: int) -> torch.Tensor:
    """Per query row, a bound on the float32 search's error in squared distance."""
    scale = FLOAT32_ERROR * query.exact.shape[1] ** 0.5
    return scale * (query.fast_norm2[start:start + rows] + reference.fast_norm2.max())


def _exact(query: torch.Tensor, reference: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Distances from each query row to its candidate reference rows `index` (rows × candidates)."""
    return torch.linalg.vector_norm(query.unsqueeze(1) - reference[index], dim=-1)


def _blocks(query: _Set, reference: _Set, block: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 squared distances |q|² + |r|² - 2 q·r) for `block` query rows at a time."""
    for start in range(0, len(query), block):
        rows = query.fast[start:start + block]
        d2 = torch.addmm(reference.fast_norm2[None, :], rows, reference.fast.T, alpha=-2)
        yield start, d2.add_(query.fast_norm2[start:start + block, None]).clamp_(min=0)


def _k_nearest(query: _Set, reference: _Set, k: int, exclude_self: bool, block: int):
    """Per query row, the float64 distances to and indices of its k nearest reference rows, in order."""
    distances, indices = [], []
    for start, d2 in _blocks(query, reference, block):
        rows = torch.arange(len(d2), device=d2.device)
        if exclude_self:
            d2[rows, rows + start] = torch.inf
        found = min(k + EXTRA_CANDIDATES, d2.shape[1])
        bound, index = torch.topk(d2, found, dim=1, largest=False)
        exact = _exact(query.exact[start:start + len(d2)], reference.exact, index)
        if exclude_self:
            exact[index == (rows + start)[:, None]] = torch.inf
        exact, order = torch.sort(exact, dim=1)
        index = torch.gather(index, 1, order)
        # rows whose k-th float64 distance might exceed a reference outside the candidates: search them whole
        outside = (bound[:, -1] - _slack(query, reference, start, len(d2))).clamp(min=0).sqrt().double()
        unsure = torch.nonzero((exact[:, k - 1] > outside) & (found < d2.shape[1])).flatten()
        for row in unsure.tolist():
            every = torch.linalg.vector_norm(query.exact[start + row] - reference.exact, dim=1)
            if exclude_self:
                every[start + row] = torch.inf
            exact[row, :k], index[row, :k] = torch.topk(every, k, largest=False)
        distances.append(exact[:, :k])
        indices.append(index[:, :k])
    return torch.cat(distances), torch.cat(indices)


def kth_neighbour_distance(features: np.ndarray, k: int, block: int = BLOCK) -> np.ndarray:
    """Distance from each vector to its k-th nearest other vector of the same set (as prdc: the
    (k + 1)-th smallest distance, the point itself at 0 included)."""
    points = _Set(features, compute_device())
    k = min(k, len(points) - 1)
    distances, _ = _k_nearest(points, points, k + 1, exclude_self=False, block=block)
    return distances[:, k].cpu().numpy()


def mutual_ball_coverage(a: np.ndarray, b: np.ndarray, radii_a: np.ndarray, radii_b: np.ndarray,
                         block: int = BLOCK) -> tuple[float, float]:
    """(share of b strictly within radii_a[i] of some a[i], share of a strictly within radii_b[j] of some
    b[j]), both from one pass over the a × b distances; pairs near a radius are decided in float64."""
    device = compute_device()
    x, y = _Set(a, device), _Set(b, device)
    ra = torch.as_tensor(np.asarray(radii_a), device=device).double()
    rb = torch.as_tensor(np.asarray(radii_b), device=device).double()
    ra2, rb2 = (ra ** 2).float(), (rb ** 2).float()
    b_covered = torch.zeros(len(y), dtype=torch.bool, device=device)
    a_covered = []
    for start, d2 in _blocks(x, y, block):
        slack = _slack(x, y, start, len(d2))[:, None]
        rows = x.exact[start:start + len(d2)]
        in_a = _inside(d2, ra2[start:start + len(d2), None], ra[start:start + len(d2), None], slack, rows, y.exact)
        in_b = _inside(d2, rb2[None, :], rb[None, :], slack, rows, y.exact)
        b_covered |= in_a.any(dim=0)
        a_covered.append(in_b.any(dim=1))
    return float(b_covered.double().mean()), float(torch.cat(a_covered).double().mean())


def _inside(d2: torch.Tensor, radius2: torch.Tensor, radius: torch.Tensor, slack: torch.Tensor,
            rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """d < radius for every pair of the block (float32 squares), recomputing in float64 the pairs float32
    cannot settle (`radius`: float64)."""
    gap = d2 - radius2
    inside = gap < -slack
    unsure = torch.nonzero(gap.abs_() <= slack, as_tuple=True)
    if len(unsure[0]):
        exact = torch.linalg.vector_norm(rows[unsure[0]] - reference[unsure[1]], dim=1)
        inside[unsure] = exact < radius.expand_as(d2)[unsure]
    return inside


def nearest(query: np.ndarray, reference: np.ndarray, exclude_self: bool = False,
            block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distance to, and index of, the nearest reference vector; `exclude_self` when both are the
    same set. An exact copy of a reference vector is found at distance 0."""
    device = compute_device()
    q = _Set(query, device)
    ref = q if exclude_self else _Set(reference, device)
    distances, indices = _k_nearest(q, ref, 1, exclude_self, block)
    return distances[:, 0].cpu().numpy(), indices[:, 0].cpu().numpy()
