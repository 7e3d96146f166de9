"""PANDA label masks: a TIFF beside each slide (`ID.tiff` ↔ `ID_mask.tiff`), label in the R channel.

Radboud: 0 background, 1 stroma, 2 benign epithelium, 3–5 Gleason 3–5. Karolinska: 0 background,
1 benign, 2 cancer. Labels are resampled with nearest neighbour only, never interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.annotations.base import AnnotationError, ClassSpec
from htd_toolkit.wsi.slide import Slide, SlideError


@dataclass(frozen=True)
class PandaFormat:
    name: str
    classes: list[ClassSpec]
    suffixes: tuple[str, ...] = ("_mask.tiff", "_mask.tif")
    missing_ok: bool = False
    uses_tissue: bool = False
    dataset: tuple[str, str] = ("panda", "cc-by-nc-sa-4.0")

    def __call__(self, path: Path | None, slide_dimensions: tuple[int, int] | None = None) -> PandaMask:
        return PandaMask(self, path, slide_dimensions)


PANDA_RADBOUD = PandaFormat("panda-radboud", [
    ClassSpec(0, "background", "#000000"), ClassSpec(1, "stroma", "#1f77b4"),
    ClassSpec(2, "benign epithelium", "#2ca02c"), ClassSpec(3, "gleason 3", "#ffbb78"),
    ClassSpec(4, "gleason 4", "#ff7f0e"), ClassSpec(5, "gleason 5", "#d62728")])
PANDA_KAROLINSKA = PandaFormat("panda-karolinska", [
    ClassSpec(0, "background", "#000000"), ClassSpec(1, "benign", "#2ca02c"), ClassSpec(2, "cancer", "#d62728")])


class PandaMask:
    uses_tissue = False

    def __init__(self, fmt: PandaFormat, path: Path | None, slide_dimensions: tuple[int, int] | None):
        if path is None:
            raise AnnotationError("no label mask")
        self.format, self.path, self.classes = fmt, Path(path), fmt.classes
        try:
            self._mask = Slide(self.path, require_mpp=False)
        except SlideError as err:
            raise AnnotationError(f"{err} (label mask)") from err
        dims = self._mask.dimensions
        if slide_dimensions is not None and dims != tuple(slide_dimensions):
            self.close()
            raise AnnotationError(f"{self.path.name}: mask is {dims[0]}x{dims[1]} but its slide is "
                                  f"{slide_dimensions[0]}x{slide_dimensions[1]}")

    def label_box(self, box: tuple[int, int, int, int], out_w: int, out_h: int,
                  tissue: np.ndarray | None = None) -> np.ndarray:
        x, y, w, h = box
        level = max((i for i, d in enumerate(self._mask.level_downsamples) if d <= w / out_w * 1.01), default=0)
        pixels = self._mask.read_level(level, x, y, w, h)
        labels = pixels[..., 0] if pixels.ndim == 3 else pixels
        if labels.shape != (out_h, out_w):
            labels = np.asarray(Image.fromarray(labels).resize((out_w, out_h), Image.Resampling.NEAREST))
        if labels.max(initial=0) >= len(self.classes):
            raise AnnotationError(f"{self.path.name}: mask value {int(labels.max())} is not a {self.format.name} "
                                  f"class (0–{len(self.classes) - 1}); is this the right --format?")
        return labels.astype(np.uint8)

    def close(self) -> None:
        self._mask.close()
