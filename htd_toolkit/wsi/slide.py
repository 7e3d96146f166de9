"""Slide access through tiffslide at a target resolution, in level-0 coordinates.

A window of `size` pixels at `mpp` microns per pixel is read from the best pyramid level (the
coarsest one at least as fine as asked) and resampled; a level within `mpp_tolerance` (5 %) of the
target is used as it is, scanner pixels unresampled (0.499 µm/px counts as 0.5). Slides without mpp metadata fall back to
the objective power (10 / power µm/px, the 20x ≙ 0.5 µm/px convention) and say so. Label and macro
images are never read.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.errors import UserError
from htd_toolkit.wsi.tiles import read_tiles, tiled_rgb_page

logger = logging.getLogger(__name__)
# tiffslide decodes the tiles of one read with half the cores by default; block reads use them all
os.environ.setdefault("TIFFSLIDE_NUM_DECODE_THREADS", str(os.cpu_count() or 1))
DECODE_THREADS = os.cpu_count() or 1


def share_cores(threads: int) -> None:
    """Decode tiles with `threads` threads in this process (for worker processes sharing the cores)."""
    global DECODE_THREADS
    DECODE_THREADS = threads
    os.environ["TIFFSLIDE_NUM_DECODE_THREADS"] = str(threads)
MICRONS_AT_1X = 10.0  # 20x ≙ 0.5 µm/px
LEVEL_TOLERANCE = 1.01  # a level up to 1 % coarser than asked still counts as fine enough
MPP_TOLERANCE = 0.05  # a level this close to the target mpp is read without resampling


class SlideError(UserError):
    """The slide cannot be used; the message names the file."""


@dataclass(frozen=True)
class Window:
    """A square window: top-left (x, y) and side in level-0 pixels."""

    x: int
    y: int
    size0: int


class Slide:
    """A whole-slide image opened with tiffslide; use as a context manager."""

    def __init__(self, path: str | Path, require_mpp: bool = True, mpp_tolerance: float = MPP_TOLERANCE):
        import tiffslide

        self.path = Path(path)
        self.mpp_tolerance = mpp_tolerance
        try:
            self._slide = tiffslide.TiffSlide(self.path)
            # one file handle serves every thread that reads this slide (`read_windows` reads blocks ahead,
            # `read_tiles` reads the tiles of a block): a real lock keeps each seek with its read. tifffile's
            # default is a no-op lock, under which a thread could get another thread's tile bytes.
            self._slide.ts_tifffile.filehandle.set_lock(True)
            self.dimensions: tuple[int, int] = tuple(self._slide.dimensions)
            self.level_dimensions = [tuple(d) for d in self._slide.level_dimensions]
            self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
            properties = dict(self._slide.properties)
            self._tiled_pages = self._fast_path_pages(properties)
        except Exception as err:  # tifffile raises many types for damaged files
            raise SlideError(f"{self.path.name}: cannot read the slide ({type(err).__name__}: {err})") from err
        self.mpp, self.mpp_source = self._resolve_mpp(properties) if require_mpp else (0.0, "none")

    def _fast_path_pages(self, properties: dict) -> list:
        """Per level, the tifffile page that `read_tiles` decodes in parallel, or None (tiffslide reads it)."""
        if properties.get("tiffslide.series-axes") != "YXS":
            return [None] * len(self.level_dimensions)
        series = self._slide.ts_tifffile.series[properties["tiffslide.series-index"]]
        return [tiled_rgb_page(series, level) for level in range(len(self.level_dimensions))]

    def _resolve_mpp(self, properties: dict) -> tuple[float, str]:
        mpp = properties.get("tiffslide.mpp-x")
        if mpp:
            return float(mpp), "mpp"
        power = properties.get("tiffslide.objective-power")
        if power:
            logger.warning("%s: no mpp metadata; using objective power %sx as %.3f µm/px",
                           self.path.name, power, MICRONS_AT_1X / float(power))
            return MICRONS_AT_1X / float(power), "objective-power"
        raise SlideError(f"{self.path.name}: the slide has neither mpp nor objective-power metadata")

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    def native_level(self, mpp: float) -> int | None:
        """The coarsest level within the tolerance of `mpp`, if any: read as is, never resampled."""
        close = [i for i, d in enumerate(self.level_downsamples)
                 if abs(self.mpp * d / mpp - 1) <= self.mpp_tolerance]
        return max(close, default=None)

    def scale(self, mpp: float) -> float:
        """Level-0 pixels per output pixel at target `mpp`."""
        native = self.native_level(mpp)
        return self.level_downsamples[native] if native is not None else mpp / self.mpp

    def output_mpp(self, mpp: float) -> float:
        """The resolution output pixels really have at target `mpp`."""
        return round(self.mpp * self.scale(mpp), 6)

    def level0_size(self, size: int, mpp: float) -> int:
        """Side in level-0 pixels of a window of `size` pixels at `mpp`."""
        return round(size * self.scale(mpp))

    def best_level(self, mpp: float) -> int:
        """The level to read for target `mpp`: the native one, else the coarsest at least as fine."""
        native = self.native_level(mpp)
        if native is not None:
            return native
        wanted = mpp / self.mpp * LEVEL_TOLERANCE
        return max((i for i, d in enumerate(self.level_downsamples) if d <= wanted), default=0)

    def level_xy(self, level: int, x: float, y: float) -> tuple[int, int]:
        """Level-0 (x, y) in the pixel grid of `level`, with each axis's own downsample."""
        (w0, h0), (w, h) = self.level_dimensions[0], self.level_dimensions[level]
        return round(x * w / w0), round(y * h / h0)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of `level` for the level-0 box (x, y, w, h), on each axis's own level grid; outside the
        slide is 0 (black), as tiffslide pads.

        Tiled 8-bit RGB levels are decoded tile-parallel by `tiles.read_tiles`; others go through
        tiffslide, which maps a level-0 location to a level with the mean downsample of both axes and
        truncates (off by a pixel when a level's sides were rounded), so it is asked for the location
        that lands on the level pixel wanted.
        """
        lx, ly = self.level_xy(level, x, y)
        lx1, ly1 = self.level_xy(level, x + w, y + h)
        width, height = max(1, lx1 - lx), max(1, ly1 - ly)
        try:
            if self._tiled_pages[level] is not None:
                return read_tiles(self._tiled_pages[level], lx, ly, width, height, DECODE_THREADS)
            ds = self.level_downsamples[level]
            location = (self._level0_for(lx, ds), self._level0_for(ly, ds))
            return self._slide.read_region(location, level, (width, height), as_array=True)
        except Exception as err:
            raise SlideError(f"{self.path.name}: cannot read region at ({x}, {y}) level {level} "
                             f"({type(err).__name__}: {err})") from err

    @staticmethod
    def _level0_for(level_coordinate: int, ds: float) -> int:
        """The smallest level-0 coordinate c with int(c / ds) == level_coordinate (int truncates towards 0,
        so left of or above the slide c lies further out)."""
        c = math.ceil(level_coordinate * ds)
        while int(c / ds) > level_coordinate:
            c -= 1
        while c > 0 and int((c - 1) / ds) == level_coordinate:
            c -= 1
        while int(c / ds) < level_coordinate:
            c += 1
        return c

    def read_box(self, x: int, y: int, w: int, h: int, mpp: float, out_w: int, out_h: int,
                 resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
        """The level-0 box (x, y, w, h) resampled to out_w x out_h pixels (about `mpp` µm/px)."""
        level = self.best_level(mpp)
        pixels = self.read_level(level, x, y, w, h)
        if pixels.shape[:2] == (out_h, out_w):
            return pixels
        return np.asarray(Image.fromarray(pixels).resize((out_w, out_h), resample))

    def overview(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at about `mpp` (never finer than the slide), and its exact downsample."""
        mpp = max(mpp, self.mpp)
        width, height = self.dimensions
        out_w, out_h = max(1, round(width * self.mpp / mpp)), max(1, round(height * self.mpp / mpp))
        image = self.read_box(0, 0, width, height, mpp, out_w, out_h, Image.Resampling.BOX)
        return image, width / out_w
