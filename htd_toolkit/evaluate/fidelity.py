"""Does a generated image follow its map, and does each region take its look from its own crop?

- `TileSegmenter`: a nearest-class-mean classifier on stain-statistics features of square cells,
  fitted on real patches and their maps: the rule that makes pseudo-maps (stain statistics of tiles,
  nearest centroid), learnt from labelled cells so it also knows the background.
- `map_fidelity`: IoU between the segmenter's cells on generated images and the conditioning maps'
  cells (majority label per cell), IoU as in `segmentation.iou_from_confusion`.
- `crop_fidelity`: per region, the distance between the region's pixels and its own crop against
  the distance to the crop of another class of the same sample, in colour statistics (mean and
  standard deviation of RGB) and in the segmenter's standardised stain-statistics space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from htd_toolkit.classes import IGNORE
from htd_toolkit.clustering.encoders import stain_stats
from htd_toolkit.evaluate.segmentation import iou_from_confusion


def cells(array: np.ndarray, tile: int) -> np.ndarray:
    """(N, H, W, ...) → (N, H/tile, W/tile, tile, tile, ...): the non-overlapping cells of each image."""
    n, h, w = array.shape[:3]
    rest = array.shape[3:]
    shaped = array[:, :h - h % tile, :w - w % tile].reshape(n, h // tile, tile, w // tile, tile, *rest)
    return np.moveaxis(shaped, 3, 2)


def cell_labels(maps: np.ndarray, num_classes: int, tile: int) -> np.ndarray:
    """(N, h, w) majority label of every cell (IGNORE where ignore pixels are the majority)."""
    grid = cells(maps, tile)
    grid = grid.reshape(*grid.shape[:3], -1)
    counts = np.stack([(grid == c).sum(-1) for c in range(num_classes)], axis=-1)
    labels = counts.argmax(-1).astype(np.uint8)
    labels[counts.max(-1) * 2 <= (grid != IGNORE).sum(-1)] = IGNORE
    labels[(grid == IGNORE).sum(-1) * 2 > grid.shape[-1]] = IGNORE
    return labels


def cell_features(images: np.ndarray, tile: int) -> np.ndarray:
    """(N, h, w, 55) stain statistics of every cell."""
    grid = cells(images, tile)
    n, h, w = grid.shape[:3]
    return stain_stats(grid.reshape(n * h * w, tile, tile, 3)).reshape(n, h, w, -1)


@dataclass
class TileSegmenter:
    tile: int
    mean: np.ndarray  # feature standardisation
    std: np.ndarray
    class_means: np.ndarray  # (K, features) in standardised units; NaN rows for classes never seen

    @classmethod
    def fit(cls, images: np.ndarray, maps: np.ndarray, num_classes: int, tile: int = 16) -> TileSegmenter:
        features = cell_features(images, tile)
        features = features.reshape(-1, features.shape[-1])
        labels = cell_labels(maps, num_classes, tile).reshape(-1)
        mean, std = features.mean(0), features.std(0) + 1e-6
        z = (features - mean) / std
        class_means = np.full((num_classes, z.shape[1]), np.nan)
        for c in range(num_classes):
            if (labels == c).any():
                class_means[c] = z[labels == c].mean(0)
        return cls(tile, mean, std, class_means)

    def standardise(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, h, w) class of every cell."""
        z = self.standardise(cell_features(images, self.tile))
        distances = ((z[..., None, :] - self.class_means) ** 2).sum(-1)
        return np.nan_to_num(distances, nan=np.inf).argmin(-1).astype(np.uint8)


def map_fidelity(segmenter: TileSegmenter, images: np.ndarray, maps: np.ndarray, class_names: list[str]) -> dict:
    """mIoU (and per class) of the segmenter's cells on `images` against the cells of `maps`."""
    k = len(class_names)
    truth = cell_labels(maps, k, segmenter.tile).reshape(-1)
    prediction = segmenter.predict(images).reshape(-1)
    valid = truth != IGNORE
    confusion = np.bincount(truth[valid].astype(np.int64) * k + prediction[valid], minlength=k * k).reshape(k, k)
    return iou_from_confusion(confusion, class_names)


def colour_stats(pixels: np.ndarray) -> np.ndarray:
    """(P, 3) uint8 → mean and standard deviation of each channel in [0, 1]."""
    values = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    return np.concatenate([values.mean(0), values.std(0)])


def region_features(segmenter: TileSegmenter, cell_z: np.ndarray, region: np.ndarray) -> np.ndarray | None:
    """Mean of an image's standardised cell features `cell_z` over the cells lying wholly inside `region`."""
    inside = cells(region[None], segmenter.tile)[0].all(axis=(2, 3))
    return cell_z[inside].mean(0) if inside.any() else None


def crop_fidelity(segmenter: TileSegmenter, images: np.ndarray, maps: np.ndarray,
                  crops: list[dict[int, np.ndarray]]) -> dict:
    """Per region with a crop: distance to its own crop vs to the crops of the sample's other classes.

    Returns, per space (`colour`, `features`), the mean distances and the share of regions closer to
    their own crop.
    """
    own, other, closer = ({"colour": [], "features": []} for _ in range(3))
    for image, labels, sample_crops in zip(images, maps, crops, strict=True):
        if len(sample_crops) < 2:
            continue
        refs = {"colour": {c: colour_stats(crop) for c, crop in sample_crops.items()},
                "features": {c: segmenter.standardise(stain_stats(crop[None]))[0] for c, crop in sample_crops.items()}}
        cell_z = segmenter.standardise(cell_features(image[None], segmenter.tile)[0])
        for cls in sample_crops:
            region = labels == cls
            if not region.any():
                continue
            values = {"colour": colour_stats(image[region]), "features": region_features(segmenter, cell_z, region)}
            for space, value in values.items():
                if value is None:
                    continue
                d_own = float(np.linalg.norm(value - refs[space][cls]))
                d_other = float(np.mean([np.linalg.norm(value - refs[space][c]) for c in sample_crops if c != cls]))
                own[space].append(d_own)
                other[space].append(d_other)
                closer[space].append(d_own < d_other)
    return {space: {"own_crop": round(float(np.mean(own[space])), 4),
                    "other_crop": round(float(np.mean(other[space])), 4),
                    "closer_to_own": round(float(np.mean(closer[space])), 4), "regions": len(own[space])}
            for space in own if own[space]}


def swap_movement(maps: np.ndarray, swapped: list[dict[int, np.ndarray]], before: np.ndarray,
                  after: np.ndarray) -> list[float]:
    """For every region given a new crop (images `before` and `after` the exchange, same seeds): how much
    nearer (negative) its colour statistics moved to the new crop's."""
    change = []
    for labels, crops, image0, image1 in zip(maps, swapped, before, after, strict=True):
        for cls, crop in crops.items():
            region = labels == cls
            target = colour_stats(crop)
            change.append(float(np.linalg.norm(colour_stats(image1[region]) - target)
                                - np.linalg.norm(colour_stats(image0[region]) - target)))
    return change
