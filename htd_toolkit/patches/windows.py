"""Candidate windows over a slide, pre-screened on the coarse label map.

Windows form a grid (a stride in output pixels) or are drawn at random; every window's class
counts on the overview come from one integral image per class, so screening a slide costs a few
array operations whatever the number of windows. Screening is lenient (coarse pixels blur class
boundaries); the exact rule is applied later at patch resolution.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from htd_toolkit.annotations.base import IGNORE
from htd_toolkit.patches.heterogeneity import HeterogeneityRule
from htd_toolkit.wsi.slide import Window

SCREEN_SLACK = 0.5  # on the overview a class needs only half its share to stay a candidate


def grid_windows(dimensions: tuple[int, int], size0: int, stride0: int) -> list[Window]:
    width, height = dimensions
    return [Window(x, y, size0) for y in range(0, height - size0 + 1, stride0)
            for x in range(0, width - size0 + 1, stride0)]


def random_windows(dimensions: tuple[int, int], size0: int, count: int, rng: np.random.Generator) -> list[Window]:
    width, height = dimensions
    if width < size0 or height < size0:
        return []
    xs = rng.integers(0, width - size0 + 1, count)
    ys = rng.integers(0, height - size0 + 1, count)
    return [Window(int(x), int(y), size0) for x, y in zip(xs, ys, strict=True)]


def window_counts(labels: np.ndarray, downsample: float, windows: list[Window], num_classes: int) -> np.ndarray:
    """(len(windows), K + 1) pixel counts per class on the overview; the last column is all pixels."""
    h, w = labels.shape
    boxes = np.array([[win.y, win.x, win.y + win.size0, win.x + win.size0] for win in windows], np.float64)
    boxes = np.clip(np.round(boxes / downsample).astype(int), 0, [h, w, h, w])
    y0, x0, y1, x1 = boxes.T
    out = np.zeros((len(windows), num_classes + 1), np.int64)
    for k in range(num_classes + 1):
        plane = (labels != IGNORE) if k == num_classes else (labels == k)
        integral = np.zeros((h + 1, w + 1), np.int64)
        integral[1:, 1:] = plane.cumsum(0).cumsum(1)
        out[:, k] = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return out


def screen(windows: list[Window], labels: np.ndarray, downsample: float, num_classes: int,
           rule: HeterogeneityRule) -> tuple[list[Window], Counter]:
    """Windows that may qualify, and how many were rejected on the overview, by reason."""
    if not windows:
        return [], Counter()
    lenient = HeterogeneityRule(min_fraction=rule.min_fraction * SCREEN_SLACK,
                                max_fraction=min(0.99, 1 - (1 - rule.max_fraction) * SCREEN_SLACK),
                                min_tissue=rule.min_tissue * SCREEN_SLACK)
    counts = window_counts(labels, downsample, windows, num_classes)
    kept, rejected = [], Counter()
    for window, row in zip(windows, counts, strict=True):
        reason = lenient.reject_reason(row[:num_classes], int(row[num_classes]))
        if reason is None:
            kept.append(window)
        else:
            rejected[reason] += 1
    return kept, rejected
