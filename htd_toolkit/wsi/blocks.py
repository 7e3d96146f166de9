"""Many windows of one slide, read in blocks: one region read per block of nearby windows, read ahead in
background threads so that decoding overlaps the caller's work (`prepare`'s patches, `embed`'s tiles)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from htd_toolkit.wsi.slide import Slide, Window


def blocks(windows: list[Window], span: int = 8) -> list[list[Window]]:
    """Windows grouped by the block of `span` x `span` window sides their top-left falls in."""
    grouped: dict[tuple[int, int], list[Window]] = {}
    for window in sorted(windows, key=lambda w: (w.y, w.x)):
        side = window.size0 * span
        grouped.setdefault((window.y // side, window.x // side), []).append(window)
    return [grouped[key] for key in sorted(grouped)]


def read_block(slide: Slide, level: int, block: list[Window]) -> tuple[list[Window], np.ndarray, tuple[int, int]]:
    x0, y0 = min(w.x for w in block), min(w.y for w in block)
    x1, y1 = max(w.x + w.size0 for w in block), max(w.y + w.size0 for w in block)
    return block, slide.read_level(level, x0, y0, x1 - x0, y1 - y0), slide.level_xy(level, x0, y0)


def read_windows(slide: Slide, windows: list[Window], size: int, mpp: float, threads: int = 2,
                 block_pixels: int = 4096):
    """Yield (window, size x size RGB) block by block: one `read_region` per block of nearby windows
    (at most about `block_pixels` level pixels a side), read `threads` blocks ahead in background
    threads so that decoding overlaps the caller's work."""
    if not windows:
        return
    level = slide.best_level(mpp)
    span = max(1, block_pixels // max(1, round(windows[0].size0 / slide.level_downsamples[level])))
    with ThreadPoolExecutor(threads) as pool:
        pending = deque()
        for block in blocks(windows, span):
            pending.append(pool.submit(read_block, slide, level, block))
            if len(pending) > threads:
                yield from _slice_block(slide, level, size, *pending.popleft().result())
        while pending:
            yield from _slice_block(slide, level, size, *pending.popleft().result())


def _slice_block(slide: Slide, level: int, size: int, block: list[Window], pixels: np.ndarray,
                 origin: tuple[int, int]):
    for window in block:
        (left, top), (right, bottom) = (slide.level_xy(level, window.x, window.y),
                                        slide.level_xy(level, window.x + window.size0, window.y + window.size0))
        patch = pixels[top - origin[1]:bottom - origin[1], left - origin[0]:right - origin[0]]
        if patch.shape[:2] != (size, size):
            patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR))
        yield window, patch
