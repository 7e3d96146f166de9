"""The heterogeneity rule (docs/formats.md), computed over tissue pixels (classes ≥ 1).

A patch qualifies when its tissue fraction is ≥ `min_tissue`, at least two tissue classes each
cover ≥ `min_fraction` of the tissue, and the dominant one covers ≤ `max_fraction`. With two tissue
classes this is the paper's "tumour fraction in [0.2, 0.8]".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REJECT_REASONS = ("low_tissue", "single_class", "dominant_class")


@dataclass(frozen=True)
class HeterogeneityRule:
    min_fraction: float = 0.2
    max_fraction: float = 0.8
    min_tissue: float = 0.5

    def __post_init__(self):
        if not 0 < self.min_fraction <= 0.5:
            raise ValueError(f"--min-fraction must be in (0, 0.5], got {self.min_fraction}")
        if not self.min_fraction <= self.max_fraction < 1:
            raise ValueError(f"--max-fraction must be in [min-fraction, 1), got {self.max_fraction}")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")

    def reject_reason(self, counts: np.ndarray, total: int) -> str | None:
        """None when a patch with per-class pixel `counts` (index = class) of `total` pixels qualifies."""
        tissue = counts[1:].astype(np.float64)
        if total == 0 or tissue.sum() == 0 or tissue.sum() / total < self.min_tissue:
            return "low_tissue"
        fractions = tissue / tissue.sum()
        if (fractions >= self.min_fraction).sum() < 2:
            return "single_class"
        if fractions.max() > self.max_fraction:
            return "dominant_class"
        return None
