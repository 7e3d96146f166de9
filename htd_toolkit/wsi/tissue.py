"""Tissue detection at low resolution: HSV saturation, median blur, Otsu, morphology, area filter.

The recipe CLAM, slideflow and lazyslide share: stained tissue is
saturated, glass and background are not. The threshold is Otsu's on the slide's overview unless one
is given; the same threshold then serves at patch resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import filters, morphology
from skimage.util import img_as_float


@dataclass(frozen=True)
class TissueParams:
    threshold: float | None = None  # saturation in [0, 255]; None = Otsu on the overview
    min_threshold: float = 8.0  # below this no stain is plausible, whatever Otsu says
    blur: int = 7  # median filter size, overview pixels
    closing: int = 2  # disk radius of the morphological closing
    min_area: float = 0.0005  # area filter, fraction of the overview


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to [0, 255]: skimage's `rgb2hsv` S channel, the same values, without hue."""
    # channel max and min first (cheap on uint8), then the conversion rgb2hsv applies to every value:
    # the same floats as max / ptp over the converted image
    high = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    low = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    value = img_as_float(high)
    delta = value - img_as_float(low)
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = delta / value
    sat[delta == 0.0] = 0.0
    return sat * 255.0


def median_above(values: np.ndarray, threshold: float, size: int) -> np.ndarray:
    """`ndimage.median_filter(values, size) > threshold`, exactly, without sorting any window.

    The median (rank n // 2 of the n = size² values) exceeds t when at least n - n // 2 of the values
    do, so a box count of `values > t` decides it (same 'reflect' border as median_filter).
    """
    ones = np.ones(size, np.int32)
    above = (values > threshold).astype(np.int32)
    counts = ndimage.correlate1d(ndimage.correlate1d(above, ones, axis=0, mode="reflect"), ones, axis=1, mode="reflect")
    n = size * size
    return counts >= n - n // 2


def otsu_threshold(sat: np.ndarray, params: TissueParams = TissueParams()) -> float:
    """The saturation threshold: the given one, else Otsu's on the median-filtered overview saturation."""
    if params.threshold is not None:
        return float(params.threshold)
    sat = ndimage.median_filter(sat, size=params.blur)
    if np.ptp(sat) < 1e-6:
        return max(params.min_threshold, float(sat.max()) + 1.0)
    return max(params.min_threshold, float(filters.threshold_otsu(sat)))


def tissue_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an overview image, and the saturation threshold used."""
    sat = saturation(rgb)
    threshold = otsu_threshold(sat, params)
    mask = median_above(sat, threshold, params.blur)
    if params.closing:
        mask = ndimage.binary_closing(mask, morphology.disk(params.closing), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    min_pixels = int(params.min_area * mask.size)
    if min_pixels > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_pixels)
    return mask, threshold


def patch_tissue(rgb: np.ndarray, threshold: float, blur: int = 5) -> np.ndarray:
    """Tissue at patch resolution with the slide's threshold (fine boundaries for the mask)."""
    return median_above(saturation(rgb), threshold, blur)
