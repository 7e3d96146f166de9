"""Stain variation in HED optical-density space (Ruifrok & Johnston's colour deconvolution, via skimage)."""

from __future__ import annotations

import numpy as np


def stain_jitter(image: np.ndarray, rng: np.random.Generator, scale: float = 0.05, shift: float = 0.01) -> np.ndarray:
    """Each HED optical density scaled by 1 ± `scale` and shifted by ± `shift` (uniform draws): uint8 RGB out."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image)
    hed = hed * rng.uniform(1 - scale, 1 + scale, 3) + rng.uniform(-shift, shift, 3)
    return (hed2rgb(hed).clip(0, 1) * 255).round().astype(np.uint8)
