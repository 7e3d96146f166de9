"""Candidate windows over a slide, pre-screened on the coarse label map.

Windows form a grid (a stride in output pixels) or are drawn at random; every window's class
counts on the overview come from one integral image per class, so screening a slide costs a few
array operations whatever the number of windows. Screening is lenient (coarse pixels blur class
boundaries); the exact rule is applied later at patch resolution.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from htd_toolkit.annotations.base import window_counts
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
