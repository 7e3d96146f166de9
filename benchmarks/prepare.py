"""Patch extraction throughput: `prepare`'s strip reader against one `read_region` per patch.

Both read the same slide and the same window list (a dense grid at the target mpp) and return the
same patches; the naive loop is what most pipelines do (tiffslide/openslide `read_region` at the
best level, then resize). Prints patches/s for each and the ratio.

    python benchmarks/prepare.py [--slide PATH] [--mpp 0.5] [--patch-size 256] [--repeats 3]

Without --slide it runs on the CC0 sample slide as scanned (240-px JPEG tiles), written as a JPEG
pyramid read at its second level, and as a 3 x 3 mosaic (6660 x 8901) with the same tiling.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.sampling.extract import read_windows
from htd_toolkit.sampling.windows import grid_windows
from htd_toolkit.wsi.pyramid import write_slide_region
from htd_toolkit.wsi.sample_slide import sample_slide_path
from htd_toolkit.wsi.slide import Slide


def naive(slide: Slide, windows, size: int, mpp: float) -> list[np.ndarray]:
    level = slide.best_level(mpp)
    ds = slide.level_downsamples[level]
    out = []
    for w in windows:
        side = round(w.size0 / ds)
        region = slide._slide.read_region((w.x, w.y), level, (side, side))
        out.append(np.asarray(region.resize((size, size), Image.Resampling.BILINEAR) if side != size else region))
    return out


def ours(slide: Slide, windows, size: int, mpp: float) -> list[np.ndarray]:
    return [pixels for _, pixels in sorted(read_windows(slide, windows, size, mpp), key=lambda item: (item[0].y, item[0].x))]


def best_of(fn, repeats: int, *args) -> tuple[float, list]:
    fn(*args)  # warm-up: file cache, codec initialisation
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def write_mosaic(svs: Path, out: Path) -> Path:
    import tiffslide

    from htd_toolkit.wsi.pyramid import write_pyramidal_tiff

    with tiffslide.TiffSlide(svs) as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
    return write_pyramidal_tiff(out, np.tile(pixels, (3, 3, 1)), float(slide.properties["tiffslide.mpp-x"]),
                                compression="jpeg", tile=240)


def run_case(label: str, path: Path, mpp: float, size: int, repeats: int) -> None:
    with Slide(path) as slide:
        size0 = slide.level0_size(size, mpp)
        windows = grid_windows(slide.dimensions, size0, size0)
        t_naive, a = best_of(naive, repeats, slide, windows, size, mpp)
        t_ours, b = best_of(ours, repeats, slide, windows, size, mpp)
    diff = float(np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b, strict=True)]))
    n = len(windows)
    print(f"{label}: {n} patches of {size} px at {mpp} µm/px, best of {repeats}")
    print(f"  naive read_region per patch : {n / t_naive:8.1f} patches/s")
    print(f"  htd-toolkit block reader    : {n / t_ours:8.1f} patches/s")
    print(f"  ratio                       : {t_naive / t_ours:8.2f}x  (mean |pixel diff| {diff:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slide", type=Path)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.slide:
        run_case(args.slide.name, args.slide, args.mpp, args.patch_size, args.repeats)
        return
    svs = sample_slide_path()
    run_case("CC0 sample .svs (240-px JPEG tiles, one level)", svs, args.mpp, args.patch_size, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        pyramid = write_slide_region(svs, Path(tmp) / "cc0.tif", compression="jpeg", tile=240)
        run_case("CC0 sample as a JPEG pyramid, level 1", pyramid, args.mpp * 2, args.patch_size, args.repeats)
        mosaic = write_mosaic(svs, Path(tmp) / "mosaic.tif")  # nine times larger, tiled as scanners do
        run_case("3x3 mosaic of the CC0 sample (JPEG, 240-px tiles)", mosaic, args.mpp, args.patch_size, args.repeats)


if __name__ == "__main__":
    main()
