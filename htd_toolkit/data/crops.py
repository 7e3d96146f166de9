"""Crops that lie entirely inside one class region, for the crop bank and the crop adapter.

A square of side d centred on pixel p fits inside a region when the chessboard distance from p to
the nearest pixel outside the region (the patch border counts as outside) is at least d // 2 + 1,
so one distance transform per class gives every feasible centre for every side at once.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PAPER_PATCH, MIN_SIDE, MAX_SIDE = 512, 50, 200  # the paper's crops: 50 to 200 px of a 512-px patch
SMALLEST_SIDE = 8


def inside_radius(region: np.ndarray) -> np.ndarray:
    """Per pixel, the largest r such that the (2r - 1)-square centred there lies inside `region`."""
    padded = np.pad(region, 1, constant_values=False)
    return ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]


def crop_side_range(patch_size: int, sides: tuple[int, int] | list[int] | None = None) -> tuple[int, int]:
    """Crop sides at patch scale: `sides` (--crop-size MIN,MAX) when given, else the paper's 50–200 px at
    512 px scaled to the patch (128 px: 12–50; 64 px: 8–25), never under 8 px."""
    if sides:
        return int(sides[0]), int(sides[1])
    low = max(SMALLEST_SIDE, round(MIN_SIDE * patch_size / PAPER_PATCH))
    return low, max(low, round(MAX_SIDE * patch_size / PAPER_PATCH))


def sample_crop_box(region: np.ndarray, rng: np.random.Generator, min_side: int = MIN_SIDE,
                    max_side: int = MAX_SIDE) -> tuple[int, int, int] | None:
    """A random (x, y, d) square with min_side ≤ d ≤ max_side entirely inside `region`, or None."""
    radius = inside_radius(region)
    largest = min(max_side, 2 * int(radius.max(initial=0)) - 1)
    if largest < min_side:
        return None
    side = int(rng.integers(min_side, largest + 1))
    half = side // 2
    rows, cols = np.nonzero(radius >= half + 1)
    pick = int(rng.integers(len(rows)))
    return int(cols[pick]) - half, int(rows[pick]) - half, side
