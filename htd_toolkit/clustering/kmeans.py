"""k-means in torch (GPU when there is one): k-means++ seeding, Lloyd iterations, chunked assignment.

Fitting runs on a sample (the per-slide diversity sample of the paper, or `max_fit_samples` drawn
uniformly), assignment streams any number of vectors in chunks, so memory is bounded by the chunk
and the centroids. Distances are ‖x‖² − 2 x·c + ‖c‖² as one matrix product per chunk. Lloyd's fixed
point is then improved by swaps (`improve_by_swaps`): a centroid whose removal costs least moves into
the cluster whose bisection gains most, kept only when the inertia falls. `hierarchical`
fits k/2 coarse clusters, then splits each into sub-clusters in proportion to its share of the
within-cluster variance, so high-variance tissue types get finer. The fitted centroids are numbered by
`canonical_order` (ascending sum of coordinates), so cluster ids do not depend on how the fit went.
Centroids are saved with the encoder spec, so new slides can be assigned later without refitting.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from htd_toolkit.errors import UserError

# Fit sample per cluster, faiss's default. With the swaps, 512 ends 0.2 % lower on the benchmark's 1M x 1,024
# tissue-type blobs (1.2777e9 vs 1.2801e9) and takes twice as long.
FIT_SAMPLES_PER_CLUSTER = 256
SKETCH_DIM = 128  # k-means++ seeding runs on a random projection to this many dimensions
ASSIGN_CHUNK = 8192  # rows per matrix product: small enough to stay in cache (3.2 s -> 2.9 s for 1M x 1,024)


def _device() -> torch.device:
    from htd_toolkit.config import compute_device

    return compute_device()


def squared_distances(x: torch.Tensor, centroids: torch.Tensor, c_norms: torch.Tensor | None = None) -> torch.Tensor:
    c_norms = (centroids * centroids).sum(1) if c_norms is None else c_norms
    d = torch.addmm(c_norms[None, :], x, centroids.T, alpha=-2.0)
    d += (x * x).sum(1, keepdim=True)
    return d.clamp_(min=0)


def bf16_is_faster(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 here: GPUs, and CPUs with AVX512-BF16 or AMX (4.7x on a
    Zen 4 core). Decided from the hardware, not by timing, so the same machine always takes the same path."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = ASSIGN_CHUNK, exact_distances: bool = False,
           low: torch.Tensor | None = None, norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, squared distance to the nearest centroid) for every row of x.

    Where bf16 products are faster, distances come from a bf16 product; a row whose two nearest
    centroids are closer than the product's worst-case rounding error (2^-6 ‖x‖ max‖c‖) is redone in
    fp32, so the labels are the fp32 ones. Distances are then approximate unless `exact_distances`.
    `low` (x in bf16) and `norms` (‖x‖²) may be given when x is assigned repeatedly, as in Lloyd's loop.
    """
    c_norms = (centroids * centroids).sum(1)
    fast = len(centroids) >= 2 and bf16_is_faster(x.device)
    c_low = centroids.to(torch.bfloat16) if fast else None
    c_max = c_norms.max().sqrt()
    labels, dists = [], []
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        x_norms = norms[start:start + chunk] if norms is not None else torch.linalg.vector_norm(part, dim=1).square_()
        if fast:
            part_low = low[start:start + chunk] if low is not None else part.to(torch.bfloat16)
            approx = torch.mm(part_low, c_low.T).float().mul_(-2).add_(c_norms[None, :])
            best, index = approx.min(1)
            second = approx.scatter_(1, index[:, None], float("inf")).min(1).values
            value = (best + x_norms).clamp_(min=0)
            unsure = (second - best) <= 2.0 ** -5 * x_norms.sqrt() * c_max
            if unsure.any():
                value[unsure], index[unsure] = squared_distances(part[unsure], centroids, c_norms).min(1)
        else:  # ‖x‖² is the same for every centroid: the argmin needs only ‖c‖² − 2 x·c
            best, index = torch.addmm(c_norms[None, :], part, centroids.T, alpha=-2.0).min(1)
            value = best.add_(x_norms).clamp_(min=0)
        if exact_distances:
            value = ((part - centroids[index]) ** 2).sum(1)
        labels.append(index)
        dists.append(value)
    return torch.cat(labels), torch.cat(dists)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, sketch_dim: int = SKETCH_DIM
                     ) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + log k candidates per step, as scikit-learn does), sampling by
    inverse CDF so that each step costs one (n, candidates) matrix product.

    Wider vectors are seeded on a Gaussian random projection to `sketch_dim` dimensions, which keeps
    squared distances to within about sqrt(2 / sketch_dim) (Johnson-Lindenstrauss): the draws are random
    anyway, and `improve_by_swaps` mends what a seeding misses. Each step then reads 1/8 of the memory
    (1,024-d) or less; the seeds are rows of x itself.
    """
    n = len(x)
    trials = 2 + int(math.log(k))
    if x.shape[1] > sketch_dim:
        projection = torch.randn(x.shape[1], sketch_dim, generator=generator).to(x.device)
        sketch = x @ projection.div_(math.sqrt(sketch_dim))
    else:
        sketch = x
    norms = torch.linalg.vector_norm(sketch, dim=1).square_()

    def distances_to(index: torch.Tensor) -> torch.Tensor:
        products = torch.mm(sketch, sketch[index].T)
        return products.mul_(-2).add_(norms[index][None, :]).add_(norms[:, None]).clamp_(min=0)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = distances_to(torch.tensor(chosen, device=x.device))[:, 0]
    for _ in range(1, k):
        cumulative = closest.cumsum(0)
        draws = (torch.rand(trials, generator=generator, dtype=torch.float64) * float(cumulative[-1]))
        candidates = torch.searchsorted(cumulative, draws.to(x.device, cumulative.dtype)).clamp_(max=n - 1)
        candidate_d = distances_to(candidates)  # (n, trials)
        best = int(torch.minimum(closest[:, None], candidate_d).sum(0).argmin())
        chosen.append(int(candidates[best]))
        closest = torch.minimum(closest, candidate_d[:, best])
    return x[torch.tensor(chosen, device=x.device)].clone()


def lloyd(x: torch.Tensor, centroids: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, float, int]:
    """Lloyd iterations until an iteration lowers the inertia by at most `tol` of it (or the centroid shift
    is below tol × the mean variance, scikit-learn's rule); empty clusters reseeded.

    The inertia rule stops where the fit stops improving: from k-means++ seeds on tissue-type embeddings
    the inertia settles in 3-5 iterations while centroids keep drifting by tiny amounts for 15-20 more
    (200,000 × 512, k = 100: 1.2561e8 after 3 iterations and after 16).
    """
    threshold = tol * x.var(0).mean().item()
    k = len(centroids)
    low = x.to(torch.bfloat16) if bf16_is_faster(x.device) else None
    norms = torch.linalg.vector_norm(x, dim=1).square_()
    iterations, previous = 0, math.inf
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported)
        labels, dists = assign(x, centroids, low=low, norms=norms)
        current = float(dists.sum())  # the inertia of `centroids`
        if previous - current <= tol * current:
            break
        previous = current
        new = cluster_means(x, labels, centroids)
        empty = torch.bincount(labels, minlength=k) == 0
        if empty.any():  # reseed with the points farthest from their centroid
            far = dists.topk(int(empty.sum())).indices
            new[empty] = x[far]
        shift = ((new - centroids) ** 2).sum(1).max().item()
        centroids = new
        if shift <= threshold:
            break
    _, dists = assign(x, centroids, low=low, norms=norms)
    return centroids, float(dists.sum()), iterations


def nearest_two(x: torch.Tensor, centroids: torch.Tensor, chunk: int = ASSIGN_CHUNK
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nearest label, its squared distance, second-nearest label, its squared distance) per row, fp32."""
    c_norms = (centroids * centroids).sum(1)
    found = []
    for start in range(0, len(x), chunk):
        values, index = squared_distances(x[start:start + chunk], centroids, c_norms).topk(2, dim=1, largest=False)
        found.append((index[:, 0], values[:, 0], index[:, 1], values[:, 1]))
    return tuple(torch.cat(column) for column in zip(*found, strict=True))


def bisect(part: torch.Tensor, generator: torch.Generator, power_steps: int = 3, refine_steps: int = 2
           ) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """(gain, the two halves' centres, which rows go to the first) of splitting a set of vectors in two:
    across its top principal direction (a few power iterations), refined by 2-means; gain = its squared
    error about its mean minus the halves'. (0, None, None) for a set too small or that will not split."""
    if len(part) < 4:
        return 0.0, None, None
    centred = part - part.mean(0)
    direction = torch.randn(part.shape[1], generator=generator).to(part.device)
    for _ in range(power_steps):
        direction = centred.T @ (centred @ direction)
        direction /= direction.norm().clamp(min=1e-12)
    side = centred @ direction > 0
    for _ in range(refine_steps + 1):
        if not 0 < int(side.sum()) < len(part):
            return 0.0, None, None
        pair = torch.stack([part[side].mean(0), part[~side].mean(0)])
        distances = torch.addmm((pair * pair).sum(1)[None, :], part, pair.T, alpha=-2.0)
        side = distances[:, 0] < distances[:, 1]
    if not 0 < int(side.sum()) < len(part):
        return 0.0, None, None
    split_error = distances.min(1).values.sum() + (part * part).sum()
    return float((centred * centred).sum() - split_error), pair, side


def plan_swaps(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, removal: torch.Tensor,
               heirs: list[int], min_gain: float, generator: torch.Generator) -> torch.Tensor | None:
    """New centroids after one round of swaps, or None when no swap is predicted to lower the inertia by
    more than `min_gain`. The cheapest removals pair with the largest bisection gains; a split piece's
    halves may be split again in the same round (a cluster that holds several tissue types). The cluster
    that inherits a removed one's members is neither removed nor split in that round."""
    k = len(centroids)
    order = torch.argsort(labels, stable=True)
    bounds = [0, *torch.bincount(labels, minlength=k).cumsum(0).tolist()]
    members = x[order]
    ties = itertools.count()
    queue = []  # (-gain, tie-break, slot, vectors, halves, side, original)
    for c in range(k):
        part = members[bounds[c]:bounds[c + 1]]
        gain, pair, side = bisect(part, generator)
        queue.append((-gain, next(ties), c, part, pair, side, True))
    heapq.heapify(queue)
    trial, split_slots, frozen = centroids.clone(), set(), set()  # frozen: removed clusters and their heirs
    for removed in removal.argsort().tolist():
        if removed in frozen or removed in split_slots or heirs[removed] in split_slots:
            continue
        while queue and queue[0][6] and queue[0][2] in frozen | {removed, heirs[removed]}:
            heapq.heappop(queue)  # an original cluster whose members change this round
        if not queue or -queue[0][0] - float(removal[removed]) <= min_gain:
            break
        _, _, slot, part, halves, side, _ = heapq.heappop(queue)
        trial[slot], trial[removed] = halves
        split_slots.add(slot)
        frozen |= {removed, heirs[removed]}
        for new_slot, rows in ((slot, part[side]), (removed, part[~side])):
            gain, pair, half_side = bisect(rows, generator)
            heapq.heappush(queue, (-gain, next(ties), new_slot, rows, pair, half_side, False))
    return trial if split_slots else None


def improve_by_swaps(x: torch.Tensor, centroids: torch.Tensor, max_iter: int, tol: float,
                     generator: torch.Generator, rounds: int = 10) -> tuple[torch.Tensor, float]:
    """Swap local search from a Lloyd fixed point (Kanungo et al. 2004, in bulk): move the centroids whose
    removal costs least (their members' second-nearest distance minus nearest) into the clusters whose
    bisection gains most, with one Lloyd update of the others; a round is kept only if the inertia fell.
    Lloyd runs to convergence once at the end.

    Lloyd cannot move a centroid from one well-separated tissue type to another, so k-means++ seeds
    that put two centroids in one large type and none in a small one stay that way. On the benchmark's
    1M x 1,024 tissue types, Lloyd alone ended 6.5-12 % above the generating types' inertia (full or
    sketched seeding) and 0.4 % after the swaps, at 1,536-d and 2,560-d alike.
    """
    k = len(centroids)
    best, best_inertia = centroids, math.inf
    for done in range(rounds + 1):
        labels, nearest, second, second_d = nearest_two(x, centroids)
        inertia = float(nearest.sum())
        if inertia >= best_inertia or done == rounds:
            break
        best, best_inertia = centroids, inertia
        removal = torch.zeros(k, device=x.device).index_add_(0, labels, second_d - nearest)
        heirs = heirs_of(labels, second, k)
        trial = plan_swaps(x, labels, cluster_means(x, labels, centroids), removal, heirs, tol * inertia, generator)
        if trial is None:
            break
        centroids = trial
    best, inertia, _ = lloyd(x, best, max_iter, tol)
    return best, inertia


def heirs_of(labels: torch.Tensor, second: torch.Tensor, k: int) -> list[int]:
    """For each cluster, the commonest second-nearest cluster of its members (itself where it has none):
    where its members go if it is removed. O(n), not a k x k table."""
    pairs, counts = torch.unique(labels * k + second, return_counts=True)
    score = counts * k + pairs % k  # one number per pair: the count first, then the heir's index breaks ties
    best = torch.full((k,), -1, dtype=score.dtype, device=labels.device).scatter_reduce(0, pairs // k, score, "amax")
    return torch.where(best >= 0, best % k, torch.arange(k, device=labels.device)).tolist()


def cluster_means(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The Lloyd update: each centroid moved to its members' mean (kept where it has none)."""
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=len(centroids)).to(x.dtype)[:, None]
    return torch.where(counts > 0, sums / counts.clamp(min=1), centroids)


@dataclass
class KMeans:
    k: int = 100
    max_iter: int = 50
    tol: float = 1e-4
    seed: int = 0
    max_fit_samples: int | None = None  # default FIT_SAMPLES_PER_CLUSTER per cluster
    hierarchical: bool = False
    swap_rounds: int = 10  # rounds of improve_by_swaps after Lloyd; 0 for plain k-means++ + Lloyd
    centroids: torch.Tensor | None = None
    inertia: float | None = None
    meta: dict = field(default_factory=dict)

    def fit(self, features: np.ndarray | torch.Tensor) -> KMeans:
        x = torch.as_tensor(features, dtype=torch.float32)
        if len(x) < self.k:
            raise ValueError(f"{len(x)} vectors cannot make {self.k} clusters")
        generator = torch.Generator().manual_seed(self.seed)
        limit = self.max_fit_samples or FIT_SAMPLES_PER_CLUSTER * self.k
        if len(x) > limit:
            x = x[torch.randperm(len(x), generator=generator)[:limit]]
        x = x.to(_device())
        if self.hierarchical and self.k >= 4:
            self.centroids = self._fit_hierarchical(x, generator)
        else:
            self.centroids, _, _ = lloyd(x, kmeans_plus_plus(x, self.k, generator), self.max_iter, self.tol)
        if self.swap_rounds and self.k >= 2:
            self.centroids, _ = improve_by_swaps(x, self.centroids, self.max_iter, self.tol, generator,
                                                 self.swap_rounds)
        self.centroids = canonical_order(self.centroids)
        self.inertia = float(assign(x, self.centroids)[1].sum())
        return self

    def _fit_hierarchical(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        coarse_k = max(2, self.k // 2)
        coarse, _, _ = lloyd(x, kmeans_plus_plus(x, coarse_k, generator), self.max_iter, self.tol)
        labels, dists = assign(x, coarse)
        sse = torch.zeros(coarse_k, device=x.device).index_add_(0, labels, dists)
        counts = torch.bincount(labels, minlength=coarse_k)
        extra = _split_budget(sse.cpu().numpy(), counts.cpu().numpy(), self.k - coarse_k)
        parts = []
        for c in range(coarse_k):
            members = x[labels == c]
            sub_k = 1 + extra[c]
            if sub_k == 1 or len(members) <= sub_k:
                parts.append(coarse[c:c + 1])
                continue
            sub, _, _ = lloyd(members, kmeans_plus_plus(members, sub_k, generator), self.max_iter, self.tol)
            parts.append(sub)
        return torch.cat(parts)

    def predict(self, features: np.ndarray | torch.Tensor, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Labels and squared distances for any number of vectors (streamed in chunks)."""
        labels, dists = [], []
        for start in range(0, len(features), chunk):
            x = torch.as_tensor(features[start:start + chunk], dtype=torch.float32).to(self.centroids.device)
            label, dist = assign(x, self.centroids)
            labels.append(label.cpu())
            dists.append(dist.cpu())
        return torch.cat(labels).numpy(), torch.cat(dists).numpy()

    def save(self, path: Path, **meta) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"k": len(self.centroids), "seed": self.seed, "inertia": self.inertia,
                "hierarchical": self.hierarchical, **self.meta, **meta}
        save_file({"centroids": self.centroids.cpu().contiguous()}, path, metadata={"htd": json.dumps(info)})

    @classmethod
    def load(cls, path: Path) -> KMeans:
        from htd_toolkit.clustering.embed import read_tensors

        (centroids,), info = read_tensors(path, ("centroids",), "pt", "centroids")
        if centroids.ndim != 2 or not centroids.is_floating_point() or not bool(torch.isfinite(centroids).all()):
            raise UserError(f"{path}: the centroids are not a finite floating-point k x dim table "
                            f"({centroids.dtype}, shape {tuple(centroids.shape)})")
        model = cls(k=len(centroids), seed=info.get("seed", 0),
                    hierarchical=info.get("hierarchical", False),
                    centroids=centroids.to(_device()), inertia=info.get("inertia"))
        model.meta = info
        return model


def canonical_order(centroids: torch.Tensor) -> torch.Tensor:
    """The centroids numbered by a rule of their own, not by the order the fit found them in: ascending sum of
    coordinates (the projection on the all-ones direction; ties by the following coordinates). Two fits
    that find the same clusters give them the same ids, whatever the seeding, the device or the order of
    the data, so that class i of a pseudo-map means one tissue type in every run."""
    keys = centroids.double().cpu().numpy()
    order = np.lexsort([*keys.T[::-1], keys.sum(1)])
    return centroids[torch.as_tensor(order, device=centroids.device)]


def _split_budget(sse: np.ndarray, counts: np.ndarray, budget: int) -> np.ndarray:
    """Extra sub-clusters per coarse cluster, in proportion to its within-cluster variance share."""
    extra = np.zeros(len(sse), int)
    capacity = np.maximum(counts - 1, 0)
    for _ in range(budget):
        score = np.where(extra < capacity, sse / (extra + 1), -1.0)
        best = int(score.argmax())
        if score[best] < 0:
            break
        extra[best] += 1
    return extra
