"""Write RGB arrays or slide regions as tiled, compressed, multi-level pyramidal TIFFs.

The levels are top-level pages, each after the first marked as a reduced-resolution image
(NewSubfileType 1) and a power-of-two downsample of the one before, averaged by area. That is the
layout OpenSlide's generic-TIFF reader, tiffslide, tifffile and QuPath all read as a pyramid; levels in
SubIFDs (OME-TIFF's layout) are invisible to OpenSlide, which then reports one level. The resolution
tags carry the microns per pixel, read back as ``tiffslide.mpp-x`` and ``openslide.mpp-x``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

MICRONS_PER_CM = 1e4


def pyramid_levels(image: np.ndarray, levels: int,
                   resample: Image.Resampling = Image.Resampling.BOX) -> list[np.ndarray]:
    """`image` and its successive 2x downsamples (area average; nearest for label masks), `levels` in all."""
    out = [image]
    for _ in range(levels - 1):
        prev = Image.fromarray(out[-1])
        size = (max(1, prev.width // 2), max(1, prev.height // 2))
        out.append(np.asarray(prev.resize(size, resample)))
    return out


def default_level_count(shape: tuple[int, ...], tile: int, minimum: int = 3) -> int:
    """Enough levels for the smallest to fit in about one tile, and never fewer than `minimum`."""
    levels, side = 1, max(shape[:2])
    while side > tile:
        side //= 2
        levels += 1
    return max(levels, minimum)


def write_pyramidal_tiff(path: str | Path, image: np.ndarray | Image.Image, mpp: float | None, *,
                         levels: int | None = None, tile: int = 256, compression: str = "zlib",
                         quality: int = 90, resample: Image.Resampling = Image.Resampling.BOX,
                         description: str | None = None) -> Path:
    """Write `image` (H x W x 3 uint8) as a tiled pyramidal TIFF with `mpp` microns per pixel at level 0.

    `compression` is any tifffile codec ("zlib" lossless by default, "jpeg" as scanners write).
    `resample=Image.Resampling.NEAREST` keeps label masks' values intact. `mpp=None` writes no
    resolution (a slide without mpp); `description` sets the first page's ImageDescription (e.g. an
    Aperio header). The file is written under a temporary name and renamed when complete.
    """
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {array.dtype} {array.shape}")
    if tile % 16:
        raise ValueError(f"tile size must be a multiple of 16, got {tile}")
    if mpp is not None and mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    levels = levels or default_level_count(array.shape, tile)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    codec_args = {"level": quality} if compression == "jpeg" else None
    with tifffile.TiffWriter(tmp, bigtiff=array.nbytes > 2**31) as tif:
        for index, level in enumerate(pyramid_levels(array, levels, resample)):
            resolution = {}
            if mpp is not None:
                pixels_per_cm = MICRONS_PER_CM / (mpp * array.shape[1] / level.shape[1])
                resolution = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(level, photometric="rgb", tile=(tile, tile), compression=compression, compressionargs=codec_args,
                      subfiletype=1 if index else 0,
                      description=description if index == 0 else None, metadata=None, **resolution)
    tmp.replace(path)
    return path


def write_slide_region(slide_path: str | Path, out: str | Path, location: tuple[int, int] = (0, 0),
                       size: tuple[int, int] | None = None, **kwargs) -> Path:
    """Read a level-0 region of a slide with tiffslide and write it as a pyramidal TIFF (same mpp)."""
    import tiffslide

    with tiffslide.TiffSlide(slide_path) as slide:
        mpp = float(slide.properties["tiffslide.mpp-x"] or 0)
        if mpp <= 0:
            raise ValueError(f"{slide_path}: the slide has no mpp metadata")
        size = size or (slide.dimensions[0] - location[0], slide.dimensions[1] - location[1])
        region = slide.read_region(location, 0, size, as_array=True)
    return write_pyramidal_tiff(out, region, mpp, **kwargs)
