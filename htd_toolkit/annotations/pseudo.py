"""Pseudo-semantic maps: k-means cluster assignments on the tile grid, read like an annotation format.

`clusters/assignments/<slide_id>.npz` holds the slide's tile label grid (0 = no tissue, c + 1 = cluster
c) and the tile side in level-0 pixels. `PseudoMapSource` rasterises any level-0 box of it at any
output size (nearest: each output pixel takes its tile's label), so the annotated path's sampling,
heterogeneity rule, crop bank and dataset folder serve unannotated slides unchanged (K = k + 1).
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import ClassVar

import numpy as np

from htd_toolkit.annotations.base import AnnotationError
from htd_toolkit.classes import ClassSpec


def cluster_classes(k: int) -> list[ClassSpec]:
    """Background plus `k` tissue types, with well-spread hues (golden-angle steps)."""
    specs = [ClassSpec(0, "background", "#000000")]
    for i in range(k):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.9)
        specs.append(ClassSpec(i + 1, f"tissue type {i + 1:03d}", f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"))
    return specs


def write_assignment(path: Path, grid: np.ndarray, tile0: int, centroids_sha: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, grid=grid, tile0=np.int64(tile0), centroids=np.array(centroids_sha))
    partial.replace(path)


class PseudoMapSource:
    uses_tissue: ClassVar[bool] = False
    suffixes: ClassVar[tuple[str, ...]] = (".npz",)
    missing_ok: ClassVar[bool] = False
    dataset: ClassVar[tuple[str, str]] = ("unannotated", "unknown")

    def __init__(self, path: Path | None, slide_dimensions: tuple[int, int] | None = None,
                 classes: list[ClassSpec] | None = None):
        if path is None or not Path(path).exists():
            raise AnnotationError(f"no cluster assignment for this slide ({path}); run `htd-toolkit cluster` first")
        with np.load(path) as data:
            self.grid, self.tile0 = data["grid"], int(data["tile0"])
        self.classes = classes or cluster_classes(int(self.grid.max()))

    def label_box(self, box: tuple[int, int, int, int], out_w: int, out_h: int,
                  tissue: np.ndarray | None = None) -> np.ndarray:
        x, y, w, h = box
        columns = np.floor((x + (np.arange(out_w) + 0.5) * w / out_w) / self.tile0).astype(int)
        rows = np.floor((y + (np.arange(out_h) + 0.5) * h / out_h) / self.tile0).astype(int)
        inside_c = (columns >= 0) & (columns < self.grid.shape[1])
        inside_r = (rows >= 0) & (rows < self.grid.shape[0])
        labels = np.zeros((out_h, out_w), np.uint8)
        labels[np.ix_(inside_r, inside_c)] = self.grid[np.ix_(rows[inside_r], columns[inside_c])]
        return labels

    def close(self) -> None:
        pass
