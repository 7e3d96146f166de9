"""Memorization audit: is any synthetic image a near-copy of a real training image or crop?

For each synthetic image: the distance to its nearest real training image, in an encoder space and in
pixel space (32 × 32 RGB), and to its nearest crop-bank crop (encoder space, over the image's
quadrants). A synthetic image is flagged when a distance is below the 1st percentile of the real
set's own nearest-neighbour distances in the same space (leave-one-out), or is 0.
Distances are float64-exact (`neighbours`), so a verbatim copy is always found at 0. The leave-one-out
distances are taken over the real set with its duplicates merged: exact ones (overlapping windows, repeated
crops) would be each other's neighbours at 0 and make the threshold 0, and near-duplicates (vectors closer
than a tenth of the real set's median distance to its 10th nearest neighbour) would drag it down to their
own distance, so that near-copies of real images went unflagged (with 300 near-duplicate pairs at noise
2e-4 among 600 real vectors: 0 of 300 near-copies flagged; docs/fidelity.md, "The near-copy audit").
Merging keeps the first vector of each group (in sorted order).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from htd_toolkit.evaluate.neighbours import kth_neighbour_distance, nearest

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95)
DUPLICATE_SCALE_NEIGHBOUR = 10  # the real set's scale: its median distance to the 10th nearest neighbour,
DUPLICATE_FRACTION = 0.1  # and vectors closer than this fraction of it are near-duplicates


def pixel_features(images: np.ndarray, side: int = 32) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.Resampling.BOX), np.float32).ravel()
                     / 255.0 for i in images])


def quadrants(images: np.ndarray) -> np.ndarray:
    h, w = images.shape[1] // 2, images.shape[2] // 2
    return np.concatenate([images[:, :h, :w], images[:, :h, w:], images[:, h:, :w], images[:, h:, w:]])


def duplicate_tolerance(distinct: np.ndarray) -> float:
    """The distance under which two real vectors count as near-duplicates: a fraction of the median distance
    to the 10th nearest neighbour (a scale that groups of up to 10 near-duplicates do not shrink)."""
    return DUPLICATE_FRACTION * float(np.median(kth_neighbour_distance(distinct, DUPLICATE_SCALE_NEIGHBOUR)))


def merge_near_duplicates(vectors: np.ndarray, tolerance: float) -> np.ndarray:
    """The vectors with near-duplicates merged: one whose nearest neighbour is an earlier one within
    `tolerance` is dropped, until none is."""
    while len(vectors) > 1:
        own, index = nearest(vectors, vectors, exclude_self=True)
        later = (own < tolerance) & (index < np.arange(len(vectors)))
        if not later.any():
            break
        vectors = vectors[~later]
    return vectors


def copy_threshold(real: np.ndarray) -> float:
    """The 1st percentile of the real vectors' distances to their nearest other one, duplicates and
    near-duplicates merged."""
    distinct = np.unique(np.asarray(real), axis=0)
    if len(distinct) < 2:
        return 0.0
    kept = merge_near_duplicates(distinct, duplicate_tolerance(distinct))
    if len(kept) < 2:
        return 0.0
    own, _ = nearest(kept, kept, exclude_self=True)
    return float(np.quantile(own, 0.01))


def flag(distance: np.ndarray, threshold: float) -> dict:
    return {"threshold": threshold, "distance": distance, "flagged": (distance < threshold) | (distance == 0),
            "quantiles": {f"q{int(q * 100):02d}": round(float(np.quantile(distance, q)), 6) for q in QUANTILES}}


def space_audit(real: np.ndarray, synthetic: np.ndarray) -> dict:
    distance, index = nearest(synthetic, real)
    return {**flag(distance, copy_threshold(real)), "index": index}


def audit(real_images: np.ndarray, synthetic_images: np.ndarray, encoder, crops: np.ndarray | None = None) -> dict:
    """Per-space results (arrays kept for the figure) and the summary metrics.json holds (docs/formats.md)."""
    spaces = {"encoder": space_audit(encoder(real_images), encoder(synthetic_images)),
              "pixel": space_audit(pixel_features(real_images), pixel_features(synthetic_images))}
    if crops is not None and len(crops) > 2:
        crop_features = encoder(crops)
        parts = encoder(quadrants(synthetic_images)).reshape(4, len(synthetic_images), -1)
        distance = np.min([nearest(part, crop_features)[0] for part in parts], axis=0)
        spaces["crops"] = flag(distance, copy_threshold(crop_features))
    flagged = np.any([s["flagged"] for s in spaces.values()], axis=0)
    return {"spaces": spaces, "flagged": flagged}


def summary(result: dict, encoder_name: str, keys: list[str]) -> dict:
    spaces = result["spaces"]
    return {"encoder": encoder_name, "nn_distance_quantiles": {n: s["quantiles"] for n, s in spaces.items()},
            "flagged": int(result["flagged"].sum()), "threshold": spaces["encoder"]["threshold"],
            "thresholds": {n: s["threshold"] for n, s in spaces.items()},
            "flagged_by_space": {n: int(s["flagged"].sum()) for n, s in spaces.items()},
            "flagged_keys": [k for k, f in zip(keys, result["flagged"], strict=True) if f]}


def side_by_side(result: dict, real_images: np.ndarray, synthetic_images: np.ndarray, rows: int = 6) -> np.ndarray:
    """Synthetic | nearest real (encoder space): the flagged ones, or else the closest pairs."""
    space = result["spaces"]["encoder"]
    order = np.argsort(space["distance"])
    chosen = [i for i in order if result["flagged"][i]][:rows] or list(order[:rows])
    return np.concatenate([np.concatenate([synthetic_images[i], real_images[space["index"][i]]], axis=1)
                           for i in chosen], axis=0)
