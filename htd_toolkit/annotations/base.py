"""What every annotation format shares: the source interface, class-map options, polygon rasterisation."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from htd_toolkit.classes import IGNORE, ClassSpec
from htd_toolkit.errors import UserError

MAX_COORDINATE = 1e7  # level-0 pixels: larger than any scanned slide; beyond it a vertex is an error

class AnnotationError(UserError):
    """An annotation file cannot be used; the message names the file."""


EXCLUDE = "exclude"  # --class-map target: the group is not a region of any class


def parse_class_map(text: str | None) -> tuple[tuple[str, str], ...]:
    """`--class-map GROUP=CLASS[,GROUP=CLASS...]` → ((group, class), ...), group names lower-cased (they
    are matched without regard to case), CLASS a class name or `exclude`."""
    pairs = []
    for item in (text or "").split(","):
        group, sep, target = (part.strip() for part in item.partition("="))
        if not item.strip():
            continue
        if not sep or not group or not target:
            raise UserError(f"--class-map: {item.strip()!r} is not GROUP=CLASS (CLASS a class name or {EXCLUDE})")
        pairs.append((group.lower(), target))
    return tuple(pairs)


def check_class_targets(format_name: str, classes: list[ClassSpec], class_map: dict[str, str],
                        extra: tuple[str, ...] = ()) -> None:
    """One line when a --class-map target is neither a class of the format nor `exclude` (or `extra`)."""
    names = [spec.name for spec in classes[1:]]
    for group, target in class_map.items():
        if target.lower() not in {n.lower() for n in names} | {EXCLUDE, *extra}:
            raise UserError(f"--class-map: {group}={target}: {target!r} is not a {format_name} class "
                            f"(choose {', '.join(names)} or {EXCLUDE})")


# A polygon: its exterior ring and its holes, each an (N, 2) float array of level-0 (x, y).
Polygon = tuple[np.ndarray, list[np.ndarray]]


def rasterize(polygons: list[Polygon], box: tuple[int, int, int, int], out_w: int, out_h: int) -> np.ndarray:
    """Boolean mask of the union of `polygons` over the level-0 `box` (x, y, w, h) at out_w x out_h.

    Output pixel (i, j) covers [j, j+1) x [i, i+1) in output units; it is inside when its centre is.
    Polygons may extend past the box; they are clipped.
    """
    x, y, w, h = box
    sx, sy = out_w / w, out_h / h
    mask = np.zeros((out_h, out_w), bool)
    for exterior, holes in polygons:
        if not _overlaps(exterior, box):
            continue
        ring = _ring_mask(exterior, x, y, sx, sy, out_w, out_h)
        for hole in holes:
            if _overlaps(hole, box):
                ring &= ~_ring_mask(hole, x, y, sx, sy, out_w, out_h)
        mask |= ring
    return mask


def _overlaps(ring: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    x, y, w, h = box
    return bool(ring[:, 0].max() >= x and ring[:, 0].min() <= x + w and ring[:, 1].max() >= y
                and ring[:, 1].min() <= y + h)


def _ring_mask(ring: np.ndarray, x: int, y: int, sx: float, sy: float, out_w: int, out_h: int) -> np.ndarray:
    # shift by half a pixel so that integer grid points are the pixel centres
    cols = (ring[:, 0] - x) * sx - 0.5
    rows = (ring[:, 1] - y) * sy - 0.5
    return polygon_mask(rows, cols, out_h, out_w)


def polygon_mask(rows: np.ndarray, cols: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """The pixels `skimage.draw.polygon` draws (centre inside, on an edge or on a vertex), by scanlines.

    skimage tests every pixel of the bounding box against every edge in C (pixels × vertices: 0.4 s
    for a 5,000-vertex outline over a 256-px patch); here each scanline meets each edge once, with
    skimage's own crossing rules, and a running count per row decides the pixels (30× faster there,
    the same pixels on thousands of random polygons, ties on the pixel grid included).
    """
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    mask = np.zeros((out_h, out_w), bool)
    r_i, c_i, r_p, c_p = rows, cols, np.roll(rows, 1), np.roll(cols, 1)  # edge from the previous vertex
    keep = (np.maximum(r_i, r_p) >= 0) & (np.minimum(r_i, r_p) <= out_h - 1) & (r_i != r_p)
    r_i, c_i, r_p, c_p = r_i[keep], c_i[keep], r_p[keep], c_p[keep]
    if len(r_i):
        y = np.arange(out_h, dtype=np.float64)[:, None]
        y0, y1 = r_i - y, r_p - y  # rows relative to each scanline, as skimage's ray test has them
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = (c_i * y1 - c_p * y0) / (y1 - y0)  # column where the edge meets the scanline
        line = np.broadcast_to(np.arange(out_h)[:, None], cross.shape)
        right, left = (y0 > 0) != (y1 > 0), (y0 < 0) != (y1 < 0)
        # odd crossings right of a pixel centre (x < cross) or left of it (x > cross) draw it
        mask = _odd_counts(line[right], 0, np.ceil(cross[right]), out_h, out_w)
        mask |= _odd_counts(line[left], np.floor(cross[left]) + 1, out_w, out_h, out_w)
    on_vertex = (np.abs(rows - np.round(rows)) < 1e-12) & (np.abs(cols - np.round(cols)) < 1e-12)
    vr, vc = np.round(rows[on_vertex]).astype(np.int64), np.round(cols[on_vertex]).astype(np.int64)
    inside = (vr >= 0) & (vr < out_h) & (vc >= 0) & (vc < out_w)
    mask[vr[inside], vc[inside]] = True
    return mask


def _odd_counts(line: np.ndarray, start, stop, out_h: int, out_w: int) -> np.ndarray:
    """Per pixel, whether an odd number of the intervals [start, stop) on its row cover it."""
    count = np.zeros((out_h, out_w + 1), np.int32)
    start = np.clip(np.broadcast_to(start, line.shape), 0, out_w).astype(np.int64)
    stop = np.clip(np.broadcast_to(stop, line.shape), 0, out_w).astype(np.int64)
    np.add.at(count, (line, start), 1)
    np.add.at(count, (line, stop), -1)
    return np.cumsum(count, axis=1)[:, :out_w] % 2 == 1


def window_counts(labels: np.ndarray, downsample: float, windows: list, num_classes: int) -> np.ndarray:
    """(len(windows), K + 1) pixel counts per class of a slide's label overview under each window (level-0
    `x`, `y`, `size0`; `downsample` level-0 pixels per overview pixel); the last column is all labelled pixels."""
    h, w = labels.shape
    boxes = np.array([[win.y, win.x, win.y + win.size0, win.x + win.size0] for win in windows], np.float64)
    boxes = np.clip(np.round(boxes / downsample).astype(int), 0, [h, w, h, w])
    y0, x0, y1, x1 = boxes.T
    out = np.zeros((len(windows), num_classes + 1), np.int64)
    for k in range(num_classes + 1):
        plane = (labels != IGNORE) if k == num_classes else (labels == k)
        integral = np.zeros((h + 1, w + 1), np.int64)
        integral[1:, 1:] = plane.cumsum(0).cumsum(1)
        out[:, k] = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return out


class AnnotationSource(Protocol):
    """One slide's annotations, ready to rasterise."""

    classes: list[ClassSpec]
    uses_tissue: ClassVar[bool]  # True when unannotated tissue gets a class of its own

    def label_box(self, box: tuple[int, int, int, int], out_w: int, out_h: int,
                  tissue: np.ndarray | None = None) -> np.ndarray:
        """uint8 label map (out_h, out_w) of the level-0 box; `tissue` is the tissue mask at that size."""
        ...

    def close(self) -> None: ...


def annotation_path(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    """The annotation file for a slide stem in `folder`, or None."""
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None
