"""Annotation files drawn on test slides, in each supported format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from htd_toolkit.wsi.pyramid import write_pyramidal_tiff

# A tumour region over the CC0 slide's tissue: a rectangle with a normal-tissue hole (level-0 pixels).
TUMOUR = [(1000, 1000), (1600, 1000), (1600, 1900), (1000, 1900)]
HOLE = [(1200, 1300), (1400, 1300), (1400, 1500), (1200, 1500)]


def asap_xml(groups: list[tuple[str, list[tuple[float, float]]]], kind: str = "Polygon") -> str:
    annotations = []
    for i, (group, points) in enumerate(groups):
        coords = "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(points))
        annotations.append(f'<Annotation Name="A{i}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
                           f"<Coordinates>{coords}</Coordinates></Annotation>")
    return (f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{"".join(annotations)}</Annotations>'
            "<AnnotationGroups/></ASAP_Annotations>")


def write_camelyon16(folder: Path, stem: str, groups=None) -> Path:
    path = folder / f"{stem}.xml"
    path.write_text(asap_xml(groups if groups is not None else [("Tumor", TUMOUR), ("_2", HOLE)]))
    return path


def camelyon_slides(pyramid: Path, root: Path, count: int) -> Path:
    """`root/slides/tumor_00N.tif` (copies of `pyramid`) and `root/ann/tumor_00N.xml`, N = 1..count."""
    import shutil

    (root / "slides").mkdir(parents=True)
    (root / "ann").mkdir()
    for i in range(1, count + 1):
        shutil.copy(pyramid, root / "slides" / f"tumor_00{i}.tif")
        write_camelyon16(root / "ann", f"tumor_00{i}")
    return root


def feature(name: str | None, rings: list, color=None) -> dict:
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, **({"color": color} if color else {})}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings}, "properties": props}


def write_geojson(folder: Path, stem: str, features: list[dict]) -> Path:
    path = folder / f"{stem}.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def closed(points):
    return [list(p) for p in points] + [list(points[0])]


def write_panda_mask(path: Path, labels: np.ndarray) -> Path:
    """A PANDA-style label mask: label in R, G = B = 0, nearest-neighbour pyramid, lossless."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels
    from PIL import Image

    return write_pyramidal_tiff(path, rgb, 0.499, resample=Image.Resampling.NEAREST)
