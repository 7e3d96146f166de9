"""Camelyon16 ASAP XML: tumour = union(`Tumor`, `_0`, `_1`) minus union(`_2`, `Exclusion`).

Coordinates are level-0 pixels (floats), ordered by `Order`. Tissue outside tumour is `normal`
(class 1), tumour is class 2, the rest background. Polygons may cross the slide border.
Slides without an XML (Camelyon16's normal_*.tif) have no tumour.

XMLs in circulation name their groups otherwise (`metastasis`/`negative`, `Metastases`, ...):
`class_map` (`--class-map metastasis=tumor,negative=exclude`) gives any group the role of tumour or
of an exclusion (`exclude`, or `normal`: not tumour). `Spline` annotations are drawn through their
control points, as ASAP's own exports and the Camelyon evaluation code do.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import ClassVar

import numpy as np
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from htd_toolkit.annotations.base import (
    EXCLUDE,
    MAX_COORDINATE,
    AnnotationError,
    Polygon,
    check_class_targets,
    rasterize,
)
from htd_toolkit.classes import ClassSpec

GROUP_ROLES = {"tumor": "tumor", "_0": "tumor", "_1": "tumor", "_2": EXCLUDE, "exclusion": EXCLUDE}
POLYGON_TYPES = {"polygon", "spline", "rectangle"}


class Camelyon16XML:
    classes: ClassVar[list[ClassSpec]] = [ClassSpec(0, "background", "#000000"), ClassSpec(1, "normal", "#1f77b4"),
                                          ClassSpec(2, "tumor", "#d62728")]
    uses_tissue: ClassVar[bool] = True
    suffixes: ClassVar[tuple[str, ...]] = (".xml",)
    missing_ok: ClassVar[bool] = True  # normal slides come without XML
    dataset: ClassVar[tuple[str, str]] = ("camelyon16", "cc0-1.0")

    def __init__(self, path: Path | None, slide_dimensions: tuple[int, int] | None = None,
                 class_map: dict[str, str] | None = None):
        self.positive: list[Polygon] = []
        self.negative: list[Polygon] = []
        self.roles = {**GROUP_ROLES, **self.check_class_map(class_map or {})}
        if path is not None:
            self._parse(Path(path))

    def _parse(self, path: Path) -> None:
        try:  # defusedxml: entity declarations (billion laughs, external entities) are refused, not expanded
            root = SafeET.parse(path).getroot()
        except DefusedXmlException as err:
            raise AnnotationError(f"{path.name}: refused: the XML declares entities ({type(err).__name__})") from err
        except (ET.ParseError, OSError) as err:
            raise AnnotationError(f"{path.name}: malformed ASAP XML ({err})") from err
        annotations = root.findall(".//Annotation")
        if root.tag != "ASAP_Annotations":
            raise AnnotationError(f"{path.name}: not an ASAP annotation file (root element <{root.tag}>)")
        for annotation in annotations:
            group = (annotation.get("PartOfGroup") or "").strip()
            kind = (annotation.get("Type") or "polygon").lower()
            if kind not in POLYGON_TYPES:
                continue  # dots and point sets carry no area
            ring = self._coordinates(annotation, path)
            role = self.roles.get(group.lower())
            if role is None:
                raise AnnotationError(f"{path.name}: unknown class name {group!r} in annotation "
                                      f"{annotation.get('Name')!r} (expected Tumor, _0, _1, _2 or Exclusion; "
                                      f"--class-map {group}=tumor or {group}={EXCLUDE} gives it a role)")
            (self.positive if role == "tumor" else self.negative).append((ring, []))

    @classmethod
    def check_class_map(cls, class_map: dict[str, str]) -> dict[str, str]:
        """Group → role ("tumor" or exclude); `normal` means not tumour, as an exclusion does."""
        check_class_targets("camelyon16", cls.classes, class_map)
        return {group: "tumor" if target.lower() == "tumor" else EXCLUDE for group, target in class_map.items()}

    @staticmethod
    def _coordinates(annotation: ET.Element, path: Path) -> np.ndarray:
        try:
            coords = sorted(annotation.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
            ring = np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise AnnotationError(f"{path.name}: bad coordinate in annotation {annotation.get('Name')!r}") from err
        if len(ring) < 3:
            raise AnnotationError(f"{path.name}: annotation {annotation.get('Name')!r} has fewer than 3 points")
        if not np.isfinite(ring).all() or np.abs(ring).max() > MAX_COORDINATE:
            raise AnnotationError(f"{path.name}: annotation {annotation.get('Name')!r} has a non-finite or "
                                  f"absurd coordinate (beyond ±{MAX_COORDINATE:.0e} pixels)")
        return ring

    def label_box(self, box: tuple[int, int, int, int], out_w: int, out_h: int,
                  tissue: np.ndarray | None = None) -> np.ndarray:
        tumour = rasterize(self.positive, box, out_w, out_h)
        if self.negative:
            tumour &= ~rasterize(self.negative, box, out_w, out_h)
        labels = np.zeros((out_h, out_w), np.uint8)
        if tissue is not None:
            labels[tissue] = 1
        labels[tumour] = 2
        return labels

    def close(self) -> None:
        pass
