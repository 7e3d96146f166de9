"""PANDA label masks: a TIFF beside each slide (`ID.tiff` ↔ `ID_mask.tiff`), label in the R channel.

Radboud: 0 background, 1 stroma, 2 benign epithelium, 3–5 Gleason 3–5. Karolinska: 0 background,
1 benign, 2 cancer. Labels are resampled with nearest neighbour only, never interpolated.
`class_map` (`--class-map "gleason 5=gleason 4,stroma=exclude"`; a group is a class name or a mask
value) merges classes or makes them background.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.annotations.base import EXCLUDE, AnnotationError, check_class_targets
from htd_toolkit.classes import ClassSpec
from htd_toolkit.wsi.slide import Slide, SlideError


@dataclass(frozen=True)
class PandaFormat:
    name: str
    classes: list[ClassSpec]
    suffixes: tuple[str, ...] = ("_mask.tiff", "_mask.tif")
    missing_ok: bool = False
    uses_tissue: bool = False
    dataset: tuple[str, str] = ("panda", "cc-by-nc-sa-4.0")

    def __call__(self, path: Path | None, slide_dimensions: tuple[int, int] | None = None,
                 class_map: dict[str, str] | None = None) -> PandaMask:
        return PandaMask(self, path, slide_dimensions, self.lookup(class_map or {}))

    def check_class_map(self, class_map: dict[str, str]) -> None:
        self.lookup(class_map)

    def lookup(self, class_map: dict[str, str]) -> np.ndarray | None:
        """Mask value → class index after --class-map (None: the identity)."""
        if not class_map:
            return None
        check_class_targets(self.name, self.classes, class_map)
        index = {spec.name.lower(): spec.index for spec in self.classes} | {str(s.index): s.index for s in self.classes}
        table = np.arange(256, dtype=np.uint8)
        for group, target in class_map.items():
            if group not in index:
                raise AnnotationError(f"--class-map: {group!r} is not a {self.name} class name or mask value "
                                      f"({', '.join(spec.name for spec in self.classes)})")
            table[index[group]] = 0 if target.lower() == EXCLUDE else index[target.lower()]
        return table


PANDA_RADBOUD = PandaFormat("panda-radboud", [
    ClassSpec(0, "background", "#000000"), ClassSpec(1, "stroma", "#1f77b4"),
    ClassSpec(2, "benign epithelium", "#2ca02c"), ClassSpec(3, "gleason 3", "#ffbb78"),
    ClassSpec(4, "gleason 4", "#ff7f0e"), ClassSpec(5, "gleason 5", "#d62728")])
PANDA_KAROLINSKA = PandaFormat("panda-karolinska", [
    ClassSpec(0, "background", "#000000"), ClassSpec(1, "benign", "#2ca02c"), ClassSpec(2, "cancer", "#d62728")])


class PandaMask:
    uses_tissue = False

    def __init__(self, fmt: PandaFormat, path: Path | None, slide_dimensions: tuple[int, int] | None,
                 lookup: np.ndarray | None = None):
        if path is None:
            raise AnnotationError("no label mask")
        self.format, self.path, self.classes, self.lookup = fmt, Path(path), fmt.classes, lookup
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
        labels = labels.astype(np.uint8)
        return labels if self.lookup is None else self.lookup[labels]

    def close(self) -> None:
        self._mask.close()
