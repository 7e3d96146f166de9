"""Tile embeddings of a slide: a grid of tiles over its tissue, each encoded, written with its grid position.

`embeddings/<slide_id>.safetensors` holds `features` (N, D) float32 and `grid` (N, 2) int32 (column, row
of the tile), with the tile side in level-0 pixels, the grid size, the mpp and the encoder in its
metadata. A slide whose file exists is done (files are written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from htd_toolkit.annotations.base import window_counts
from htd_toolkit.errors import UserError
from htd_toolkit.wsi.blocks import read_windows
from htd_toolkit.wsi.slide import Slide, SlideError, Window
from htd_toolkit.wsi.tissue import tissue_mask

OVERVIEW_CELLS_PER_TILE = 8


@dataclass(frozen=True)
class TileGrid:
    tile0: int  # tile side in level-0 pixels
    columns: int
    rows: int
    cells: np.ndarray  # (N, 2) int32 column, row of the tissue tiles

    def windows(self) -> list[Window]:
        return [Window(int(c) * self.tile0, int(r) * self.tile0, self.tile0) for c, r in self.cells]


def tissue_tiles(slide: Slide, tile_size: int, mpp: float, min_tissue: float = 0.5,
                 threshold: float | None = None) -> TileGrid:
    """The grid of tiles whose tissue fraction (on the overview tissue mask) is at least `min_tissue`."""
    from htd_toolkit.wsi.tissue import TissueParams

    tile0 = slide.level0_size(tile_size, mpp)
    overview, downsample = slide.overview(mpp * tile_size / OVERVIEW_CELLS_PER_TILE)
    tissue, _ = tissue_mask(overview, TissueParams(threshold=threshold))
    width, height = slide.dimensions
    columns, rows = width // tile0, height // tile0
    cells = np.array([(c, r) for r in range(rows) for c in range(columns)], np.int32).reshape(-1, 2)
    windows = [Window(int(c) * tile0, int(r) * tile0, tile0) for c, r in cells]
    counts = window_counts(tissue.astype(np.uint8), downsample, windows, 2) if windows else np.zeros((0, 3))
    keep = counts[:, 1] >= min_tissue * np.maximum(counts[:, 2], 1) if len(windows) else np.zeros(0, bool)
    if not keep.any():
        raise SlideError(f"{slide.path.name}: no tissue detected")
    return TileGrid(tile0, columns, rows, cells[keep])


def embed_slide(path: Path, slide_id: str, encoder, out: Path, tile_size: int, mpp: float, batch_size: int = 64,
                encoder_spec: str = "") -> Path:
    """Encode every tissue tile of one slide into `out/embeddings/<slide_id>.safetensors`."""
    from safetensors.numpy import save_file

    target = out / "embeddings" / f"{slide_id}.safetensors"
    with Slide(path) as slide:
        grid = tissue_tiles(slide, tile_size, mpp)
        features, batch, cells = [], [], []
        for window, pixels in read_windows(slide, grid.windows(), tile_size, mpp):  # block order
            cells.append((window.x // grid.tile0, window.y // grid.tile0))
            batch.append(pixels)
            if len(batch) == batch_size:
                features.append(encoder(np.stack(batch)))
                batch = []
        if batch:
            features.append(encoder(np.stack(batch)))
        effective_mpp = slide.output_mpp(mpp)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    meta = {"tile0": grid.tile0, "columns": grid.columns, "rows": grid.rows, "mpp": effective_mpp,
            "tile_size": tile_size, "encoder": encoder_spec or encoder.name}
    save_file({"features": np.concatenate(features).astype(np.float32), "grid": np.array(cells, np.int32)}, str(partial),
              metadata={"htd": json.dumps(meta)})
    partial.replace(target)
    return target


def read_tensors(path: Path, names: tuple[str, ...], framework: str, what: str) -> tuple[list, dict]:
    """The named tensors of an htd-toolkit safetensors file and its "htd" metadata; one line naming the file
    when it is damaged or another program's (such files are copied between machines: shared centroids)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework) as handle:
            meta = json.loads((handle.metadata() or {})["htd"])
            if not isinstance(meta, dict):
                raise ValueError("its htd metadata is not an object")
            return [handle.get_tensor(name) for name in names], meta
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        raise UserError(f"{path}: not an htd-toolkit {what} file ({type(err).__name__}); delete it to make it "
                        "again") from err


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    (features, grid), meta = read_tensors(path, ("features", "grid"), "np", "embeddings")
    return features, grid, meta
