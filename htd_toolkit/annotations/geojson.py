"""GeoJSON as QuPath exports it: a FeatureCollection (or a bare list of features) of Polygon /
MultiPolygon geometries in level-0 pixels, the class in `properties.classification.name`.

Classes are background plus the names given with `--classes`, or else every name of a region with
an area seen across the dataset's files in first-seen order (files in sorted order), so indices agree
between slides; `class_map` (`--class-map GROUP=CLASS|exclude`) renames or drops classes first.
Colours come from QuPath's `classification.color` (0.4+) or `colorRGB` (≤ 0.3, a signed ARGB int).

What QuPath versions write differently: detections, cells and tiles (`properties.objectType`, or
the feature `id` `PathDetectionObject`/`PathCellObject`/`PathTileObject` of 0.2) are not regions and
are skipped unless `include_detections`; a classification written as a string holding a dict
(`"{'name': 'Tumor'}"`, from scripts that str() it) is read as the name inside.
"""

from __future__ import annotations

import ast
import contextlib
import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from htd_toolkit.annotations.base import (
    EXCLUDE,
    MAX_COORDINATE,
    AnnotationError,
    Polygon,
    rasterize,
)
from htd_toolkit.classes import ClassSpec, classes_from_names


def read_features(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{Path(path).name}: malformed GeoJSON ({err})") from err
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise AnnotationError(f"{Path(path).name}: expected a GeoJSON FeatureCollection or a list of features")
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise AnnotationError(f"{Path(path).name}: every GeoJSON feature must be an object")
    return features


NOT_REGIONS = {"detection", "cell", "tile", "pathdetectionobject", "pathcellobject", "pathtileobject"}
AREA_TYPES = {"Polygon", "MultiPolygon"}


def is_region(feature: dict, include_detections: bool = False) -> bool:
    """An annotation with an area (detections, cells and tiles only when asked for)."""
    kind = str((feature.get("properties") or {}).get("objectType") or feature.get("id") or "").lower()
    return ((feature.get("geometry") or {}).get("type") in AREA_TYPES
            and (include_detections or kind not in NOT_REGIONS))


def feature_class(feature: dict) -> tuple[str | None, str | None]:
    """(class name, '#rrggbb' colour or None) of a QuPath feature; name None when unclassified."""
    props = feature.get("properties") or {}
    classification = props.get("classification") or {}
    if isinstance(classification, str) and classification.lstrip().startswith("{"):
        with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            classification = ast.literal_eval(classification)  # a dict written with str(); nothing is run
    if isinstance(classification, str):
        return classification, None
    if not isinstance(classification, dict):
        classification = {}
    name = classification.get("name") or props.get("name") if classification else props.get("classname")
    color = classification.get("color", classification.get("colorRGB"))
    if isinstance(color, list) and len(color) == 3 and all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
        color = "#{:02x}{:02x}{:02x}".format(*[int(c) for c in color])
    elif isinstance(color, int) and not isinstance(color, bool):
        color = f"#{color & 0xFFFFFF:06x}"
    else:
        color = None
    return (str(name) if name is not None else None), color


def mapped_class(feature: dict, class_map: dict[str, str]) -> tuple[str | None, str | None]:
    """`feature_class` after --class-map; name None when unclassified or excluded."""
    name, color = feature_class(feature)
    if name is not None:
        name = class_map.get(name.lower(), name)
    return (None, None) if name is not None and name.lower() == EXCLUDE else (name, color)


def geometry_polygons(geometry: dict, path: Path) -> list[Polygon]:
    kind = (geometry or {}).get("type")
    coords = (geometry or {}).get("coordinates")
    try:
        if kind == "Polygon":
            rings = [coords]
        elif kind == "MultiPolygon":
            rings = coords
        else:
            return []  # points and lines carry no area
        polygons = [(np.asarray(poly[0], np.float64)[:, :2], [np.asarray(h, np.float64)[:, :2] for h in poly[1:]])
                    for poly in rings]
    except (TypeError, IndexError, ValueError) as err:
        raise AnnotationError(f"{path.name}: bad {kind} coordinates ({err})") from err
    for outer, holes in polygons:
        for ring in (outer, *holes):
            if len(ring) < 3:
                raise AnnotationError(f"{path.name}: a {kind} ring with {len(ring)} point(s); a ring needs at least 3")
            if not np.isfinite(ring).all() or np.abs(ring).max() > MAX_COORDINATE:
                raise AnnotationError(f"{path.name}: a {kind} vertex is not finite or beyond {MAX_COORDINATE:g} px")
    return polygons


def discover_classes(paths: list[Path], class_map: dict[str, str] | None = None,
                     include_detections: bool = False) -> list[ClassSpec]:
    """Class list from every file's region classes, first seen first (a class with no area gets none)."""
    names: list[str] = []
    colors: dict[str, str] = {}
    for path in sorted(paths):
        for feature in read_features(path):
            if not is_region(feature, include_detections):
                continue
            name, color = mapped_class(feature, class_map or {})
            if name and name not in names:
                names.append(name)
                if color:
                    colors[name] = color
    return classes_from_names(names, colors)


class GeoJSONAnnotations:
    uses_tissue: ClassVar[bool] = False
    suffixes: ClassVar[tuple[str, ...]] = (".geojson", ".json")
    missing_ok: ClassVar[bool] = False
    dataset: ClassVar[tuple[str, str]] = ("geojson", "unknown")

    def __init__(self, path: Path | None, slide_dimensions: tuple[int, int] | None = None,
                 classes: list[ClassSpec] | None = None, class_map: dict[str, str] | None = None,
                 include_detections: bool = False):
        if path is None:
            raise AnnotationError("no GeoJSON annotation")
        self.path = Path(path)
        class_map = class_map or {}
        self.classes = classes or discover_classes([self.path], class_map, include_detections)
        index = {spec.name: spec.index for spec in self.classes}
        self.by_class: dict[int, list[Polygon]] = {}
        for feature in read_features(self.path):
            if not is_region(feature, include_detections):
                continue
            name, _ = mapped_class(feature, class_map)
            if name is None:
                continue
            if name not in index:
                known = ", ".join(spec.name for spec in self.classes[1:])
                raise AnnotationError(f"{self.path.name}: unknown class name {name!r} (known: {known})")
            self.by_class.setdefault(index[name], []).extend(geometry_polygons(feature.get("geometry"), self.path))

    def label_box(self, box: tuple[int, int, int, int], out_w: int, out_h: int,
                  tissue: np.ndarray | None = None) -> np.ndarray:
        labels = np.zeros((out_h, out_w), np.uint8)
        for index in sorted(self.by_class):  # later classes are drawn over earlier ones
            labels[rasterize(self.by_class[index], box, out_w, out_h)] = index
        return labels

    def close(self) -> None:
        pass
