"""Pictures: class maps in their colours, crop strips, overlays."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from htd_toolkit.classes import ClassSpec, colorize


def overlay(image: np.ndarray, labels: np.ndarray, classes: list[ClassSpec], alpha: float = 0.45) -> np.ndarray:
    return (image * (1 - alpha) + colorize(labels, classes) * alpha).round().astype(np.uint8)


def crop_strip(crops: torch.Tensor | None, crop_classes: torch.Tensor | None, size: int) -> np.ndarray:
    """A size x size tile showing a sample's crops (in [-1, 1]) in a grid; empty slots grey."""
    tile = np.full((size, size, 3), 200, np.uint8)
    if crops is None:
        return tile
    n = crops.shape[0]
    grid = int(np.ceil(np.sqrt(n)))
    cell = size // grid
    for slot in range(n):
        if crop_classes is not None and int(crop_classes[slot]) == 0:
            continue
        pixels = F.interpolate(crops[slot][None].float(), size=(cell, cell), mode="bilinear", align_corners=False)[0]
        pixels = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        row, col = divmod(slot, grid)
        tile[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = pixels
    return tile


def sample_grid(samples: list[tuple[np.ndarray, np.ndarray]], classes: list[ClassSpec], columns: int = 2,
                tile: int = 256) -> np.ndarray:
    """Pairs image | mask overlay, `columns` pairs per row, each tile resized to `tile` px."""
    from PIL import Image

    pairs = []
    for image, labels in samples:
        left = np.asarray(Image.fromarray(image).resize((tile, tile), Image.Resampling.BILINEAR))
        right = np.asarray(Image.fromarray(overlay(image, labels, classes)).resize((tile, tile),
                                                                                   Image.Resampling.NEAREST))
        pairs.append(np.concatenate([left, right], axis=1))
    while len(pairs) % columns:
        pairs.append(np.full_like(pairs[0], 255))
    rows = [np.concatenate(pairs[i:i + columns], axis=1) for i in range(0, len(pairs), columns)]
    return np.concatenate(rows, axis=0)


def bar_chart(counts: list[int], edges: list[float], title: str, width: int = 480, height: int = 240) -> np.ndarray:
    """A labelled histogram drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left, bottom, top = 40, height - 30, 30
    draw.text((left, 8), title, fill="black")
    peak = max(max(counts), 1)
    bar = (width - left - 10) / len(counts)
    for i, count in enumerate(counts):
        x0 = left + i * bar
        y0 = bottom - (bottom - top) * count / peak
        draw.rectangle([x0 + 2, y0, x0 + bar - 2, bottom], fill="#1f77b4")
        draw.text((x0 + 2, bottom + 4), f"{edges[i]:.1f}", fill="black")
        if count:
            draw.text((x0 + 2, y0 - 12), str(count), fill="black")
    draw.line([left, bottom, width - 10, bottom], fill="black")
    return np.asarray(canvas)
