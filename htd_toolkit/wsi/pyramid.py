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

from htd_toolkit.wsi.raw import RawArray

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


def write_streamed_pyramid(path: str | Path, level0: RawArray, mpp: float | None, work: Path, *, tile: int = 256,
                           compression: str = "zlib", quality: int = 90, labels: bool = False,
                           levels: int | None = None) -> Path:
    """`write_pyramidal_tiff` for an array on disk (RGB, or class ids when `labels`): each level is made
    from the one before, band by band, into `work`, and written tile by tile, so memory holds a band of
    rows, never a level. Levels halve by area average (RGB) or by taking every second pixel (labels: the
    values stay class ids, and level k is level 0 sampled every 2^k pixels)."""
    if tile % 16:
        raise ValueError(f"tile size must be a multiple of 16, got {tile}")
    levels = levels or default_level_count(level0.shape, tile)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    codec_args = {"level": quality} if compression == "jpeg" else None
    current = level0
    with tifffile.TiffWriter(tmp, bigtiff=level0.shape[0] * level0.row_bytes > 2**31) as tif:
        for index in range(levels):
            if index:
                current = halve(current, work / f"{path.name}.level{index}.raw", labels, 2 * tile)
            height, width, channels = current.shape
            resolution = {}
            if mpp is not None:
                pixels_per_cm = MICRONS_PER_CM / (mpp * level0.shape[1] / width)
                resolution = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(tiles_of(current, tile), shape=(height, width, channels) if channels > 1 else (height, width),
                      dtype=np.uint8, photometric="minisblack" if labels else "rgb", tile=(tile, tile),
                      compression=compression, compressionargs=codec_args, subfiletype=1 if index else 0,
                      metadata=None, **resolution)
            if index > 1:
                previous = work / f"{path.name}.level{index - 1}.raw"
                previous.unlink(missing_ok=True)
    for leftover in work.glob(f"{path.name}.level*.raw"):
        leftover.unlink()
    tmp.replace(path)
    return path


def tiles_of(array: RawArray, tile: int):
    """The array's tiles in row-major order, edge tiles padded with zeros to tile x tile."""
    _, width, channels = array.shape
    for top, bottom in array.bands(tile):
        band = array.read(top, bottom)
        for left in range(0, width, tile):
            block = np.zeros((tile, tile, channels), np.uint8)
            part = band[:, left:left + tile]
            block[:part.shape[0], :part.shape[1]] = part
            yield block if channels > 1 else block[..., 0]


def halve(source: RawArray, target: Path, labels: bool, band_rows: int) -> RawArray:
    """`source` at half size (floor), band by band: 2 x 2 area mean rounded, or every second pixel."""
    height, width, channels = source.shape[0] // 2, source.shape[1] // 2, source.shape[2]
    out = RawArray.create(target, (max(1, height), max(1, width), channels), np.uint8)
    for top, bottom in source.bands(band_rows):
        band = source.read(top, bottom)[: (bottom - top) // 2 * 2, : width * 2]
        if labels:
            small = band[::2, ::2]
        else:
            small = band.reshape(len(band) // 2, 2, width, 2, channels).mean(axis=(1, 3)) + 0.5
        out.write(top // 2, small.astype(np.uint8))
    return out


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
