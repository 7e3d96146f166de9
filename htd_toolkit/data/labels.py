"""Class statistics of label maps, as every stage counts them: pixels per class (the ignore value not
counted), the class fractions KEY.json stores, and the tissue classes a map's crops are drawn for."""

from __future__ import annotations

import numpy as np

from htd_toolkit.classes import IGNORE


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class; the ignore value is not counted."""
    return np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes]


def class_fractions(labels: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of the patch covered by each class (K floats, index = class), as KEY.json stores it."""
    return [round(float(c) / labels.size, 6) for c in class_counts(labels, num_classes)]


def classes_present(labels: np.ndarray, max_crops: int) -> list[int]:
    """Tissue classes in a map, largest first, at most `max_crops` (ties broken by class id)."""
    ids, counts = np.unique(labels[(labels > 0) & (labels != IGNORE)], return_counts=True)
    order = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    return sorted(c for c, _ in order[:max_crops])
