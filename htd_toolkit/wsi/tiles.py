"""Region reads that decode a level's tiles in parallel, straight through tifffile.

tiffslide's `read_region` goes through a zarr store and decodes the tiles of one read one after the
other: on the CC0 mosaic a whole-level read took 0.27 s through it against 0.13–0.17 s for tifffile
decoding the same tiles on two threads. Block reads of `prepare` are large (thousands of pixels a
side), so here the tiles a region touches are read in file order and decoded by a thread pool
(imagecodecs releases the GIL), each thread writing its own part of the output. Pixels are the
same as tiffslide's (same decoder); outside the level is 0, as tiffslide pads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tifffile

# compressions whose tifffile decoders are known to give tiffslide's pixels: none, LZW, JPEG,
# deflate, Aperio JPEG 2000 (YCbCr and RGB), JPEG 2000
SUPPORTED_COMPRESSIONS = {1, 5, 7, 8, 32946, 33003, 33005, 34712}
JPEG = {6, 7, 34892, 33007}


def tiled_rgb_page(series, level: int):
    """The tifffile page of `level` when the fast path applies (one tiled, contiguous 8-bit RGB page), else None."""
    pages = series.levels[level].pages
    page = pages[0] if len(pages) == 1 else None
    if page is None or getattr(page, "keyframe", None) is not page:
        return None
    if not page.is_tiled or page.samplesperpixel != 3 or page.dtype != np.uint8 or page.planarconfig != 1:
        return None
    if page.compression not in SUPPORTED_COMPRESSIONS:
        return None
    page.decode  # noqa: B018  tifffile builds its decoder once, reading the first tile (is_jfif) without the lock
    return page


def read_tiles(page, x: int, y: int, width: int, height: int, workers: int) -> np.ndarray:
    """(height, width, 3) pixels of `page` from level pixel (x, y); outside the page is 0."""
    out = np.zeros((height, width, page.samplesperpixel), page.dtype)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, page.imagewidth), min(y + height, page.imagelength)
    if x0 >= x1 or y0 >= y1:
        return out
    tile_h, tile_w = page.tilelength, page.tilewidth
    across = -(-page.imagewidth // tile_w)
    indices = [row * across + col for row in range(y0 // tile_h, (y1 - 1) // tile_h + 1)
               for col in range(x0 // tile_w, (x1 - 1) // tile_w + 1)]
    handle = page.parent.filehandle
    if isinstance(handle.lock, tifffile.NullContext):  # threads sharing the handle would mix their reads
        raise RuntimeError(f"{handle.name}: read_tiles needs the file handle's lock set (filehandle.set_lock(True))")
    segments = list(handle.read_segments([page.dataoffsets[i] for i in indices],
                                         [page.databytecounts[i] for i in indices],
                                         indices=indices, lock=handle.lock, sort=True, flat=True))
    options = {"_fullsize": True}
    if page.compression in JPEG:
        options.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)

    def place(segment) -> None:
        tile, (_, _, top, left, _), _ = page.decode(*segment, **options)
        if tile is None:  # an empty tile stays 0
            return
        sy0, sy1, sx0, sx1 = max(top, y0), min(top + tile_h, y1), max(left, x0), min(left + tile_w, x1)
        out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[0, sy0 - top:sy1 - top, sx0 - left:sx1 - left]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in pool.map(place, segments):  # re-raises a decoding error here
            pass
    return out
