"""Many threads reading one slide get the pixels one thread gets: reads of one file handle are serialised.

A JPEG-tiled pyramid of textured blocks (every tile different), read through one `Slide` from many
threads at once, box after box, and every pixel compared with the same boxes read one at a time.
Without a lock on the shared tifffile handle a thread seeks while another reads, and tiles come back
with another tile's bytes (wrong pixels, no error) or fail to decode.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from htd_toolkit.wsi.blocks import read_windows
from htd_toolkit.wsi.pyramid import write_pyramidal_tiff
from htd_toolkit.wsi.slide import Slide, Window


def jpeg_pyramid(path, side: int, tile: int = 256):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    return write_pyramidal_tiff(path, blocks.repeat(16, 0).repeat(16, 1), mpp=0.25, tile=tile, compression="jpeg")


def random_boxes(side: int, count: int, seed: int) -> list[tuple[int, int, int, int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, 2)), int(rng.integers(0, side - 512)), int(rng.integers(0, side - 512)), 512, 512)
            for _ in range(count)]


def threaded_reads_differing(path, side: int, rounds: int, reads: int, threads: int) -> tuple[int, int]:
    """(reads with other pixels than a one-thread read, reads that raised) over `rounds` rounds."""
    wrong = raised = 0
    with Slide(path) as slide:
        for round_ in range(rounds):
            boxes = random_boxes(side, reads, round_)
            expected = [slide.read_level(*box) for box in boxes]
            with ThreadPoolExecutor(threads) as pool:
                futures = [pool.submit(slide.read_level, *box) for box in boxes]
                for future, pixels in zip(futures, expected, strict=True):
                    try:
                        wrong += not np.array_equal(future.result(), pixels)
                    except Exception:  # a tile given another tile's bytes may fail to decode
                        raised += 1
    return wrong, raised


def test_threads_reading_one_slide_get_the_one_thread_pixels(tmp_path):
    path = jpeg_pyramid(tmp_path / "jpeg.tif", 4096)
    assert threaded_reads_differing(path, 4096, rounds=4, reads=150, threads=8) == (0, 0)


def test_read_ahead_blocks_equal_one_thread_reads(tmp_path):
    """`read_windows` (prepare's and embed's path) reads blocks ahead in threads: same patches as reading
    each window alone."""
    path = jpeg_pyramid(tmp_path / "jpeg.tif", 4096)
    windows = [Window(x, y, 256) for y in range(0, 4096, 256) for x in range(0, 4096, 256)]
    with Slide(path) as slide:
        for _ in range(2):
            got = dict(read_windows(slide, windows, 256, 0.25, threads=4, block_pixels=512))
            assert len(got) == len(windows)
            for window in windows:
                assert np.array_equal(got[window], slide.read_level(0, window.x, window.y, 256, 256)), window


@pytest.mark.slow
def test_threads_reading_a_large_slide_many_times_get_the_one_thread_pixels(tmp_path):
    path = jpeg_pyramid(tmp_path / "jpeg.tif", 8192)
    assert threaded_reads_differing(path, 8192, rounds=20, reads=360, threads=12) == (0, 0)
