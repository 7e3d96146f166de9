"""Slide-sized maps and a crop bank from the fidelity fixture (held-out CC0 maps and crops), for the
`generate-slide` tests and benchmark."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.data.shards import IMAGE, META, ShardSet

FIDELITY_FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "fidelity_cc0.npz"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def fixture_crop_bank(root: Path, fixture: Path = FIDELITY_FIXTURE) -> Path:
    """`root/crop_bank` in prepare's format, holding the fixture's held-out crops by class."""
    with np.load(fixture) as data:
        crops, classes = data["crops"], data["crop_classes"]
    for cls in (1, 2, 3):
        shard_set = ShardSet(root / "crop_bank", f"c{cls:03d}", 100, root)
        picked = [crop for row, pair in zip(classes, crops, strict=True) for c, crop in zip(row, pair, strict=True)
                  if c == cls] or [crops[0, 0]]
        for index, crop in enumerate(picked):
            meta = {"class": cls, "box": [0, 0, crop.shape[0]]}
            shard_set.add((f"held_out_{index:03d}_c{cls}", [(IMAGE, png(crop)), (META, json.dumps(meta).encode())]))
        shard_set.close()
    return root / "crop_bank"


def fixture_grid(cells: int, seed: int = 0, background: bool = True, glass: int = 0,
                 fixture: Path = FIDELITY_FIXTURE) -> np.ndarray:
    """A cells x cells class grid tiled from the fixture's held-out maps (every 4th pixel: 16 x 16 cells each,
    16 µm per cell at the maps' 1 µm/px and 64 px). `background=False` turns background cells into tissue;
    `glass` blanks a square top-left corner of that many cells."""
    with np.load(fixture) as data:
        maps = data["maps"][:, ::4, ::4]
    rng = np.random.default_rng(seed)
    side = maps.shape[1]
    grid = np.zeros((cells, cells), np.uint8)
    for top in range(0, cells, side):
        for left in range(0, cells, side):
            grid[top:top + side, left:left + side] = maps[rng.integers(len(maps))][:cells - top, :cells - left]
    if not background:
        grid[grid == 0] = 2
    grid[:glass, :glass] = 0
    return grid
