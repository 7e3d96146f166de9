"""Slide-sized arrays on disk, read and written by bands of rows.

A gigapixel slide's pixels, latents or blending sums do not fit in memory; a `RawArray` keeps them in a
plain file (C order, rows first) and maps only the band of rows being worked on, so what a process holds
is bounded by the band, not the slide. Why not one `np.memmap` of the whole file: its touched pages stay
mapped (and counted in the process's resident memory) until the whole map is closed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class RawArray:
    """A (rows, columns, channels) array in `path`; `create` makes it (zero-filled, sparse on disk)."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype=np.float32):
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int, int], dtype=np.float32) -> RawArray:
        array = cls(path, shape, dtype)
        with open(array.path, "wb") as f:
            f.truncate(array.shape[0] * array.row_bytes)
        return array

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size == self.shape[0] * self.row_bytes

    def _band(self, top: int, bottom: int, mode: str) -> np.memmap:
        if not 0 <= top <= bottom <= self.shape[0]:
            raise IndexError(f"rows {top}:{bottom} outside 0:{self.shape[0]}")
        return np.memmap(self.path, self.dtype, mode, offset=top * self.row_bytes,
                         shape=(bottom - top, *self.shape[1:]))

    def read(self, top: int, bottom: int) -> np.ndarray:
        """A copy of rows [top, bottom)."""
        if top == bottom:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        band = self._band(top, bottom, "r")
        out = np.array(band)
        del band
        return out

    def write(self, top: int, values: np.ndarray) -> None:
        """Rows [top, top + len(values)) ← values."""
        if not len(values):
            return
        band = self._band(top, top + len(values), "r+")
        band[:] = values
        band.flush()
        del band

    def bands(self, rows: int):
        """(top, bottom) of consecutive bands of at most `rows` rows."""
        for top in range(0, self.shape[0], rows):
            yield top, min(top + rows, self.shape[0])
