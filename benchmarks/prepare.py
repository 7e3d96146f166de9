"""Patch extraction throughput: `prepare`'s strip reader against one `read_region` per patch, with
tiffslide and with OpenSlide (`openslide-python` + `openslide-bin`, what most pipelines read with).

All read the same slide and the same window list (a dense grid at the target mpp) and return the
same patches; the naive loop is what most pipelines do (`read_region` at the best level, then
resize). Prints patches/s for each, the ratios and the pixel differences; the last line is one JSON
object with every case's figures (`ratio`, `openslide_ratio`, ...).

    python benchmarks/prepare.py [--slide PATH] [--mpp 0.5] [--patch-size 256] [--repeats 3]

Without --slide it runs on the CC0 sample slide as scanned (240-px JPEG tiles), written as a JPEG
pyramid read at its second level, and as a 3 x 3 mosaic (6660 x 8901) with the same tiling.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.patches.windows import grid_windows
from htd_toolkit.wsi.blocks import read_windows
from htd_toolkit.wsi.pyramid import write_slide_region
from htd_toolkit.wsi.sample_slide import sample_slide_path
from htd_toolkit.wsi.slide import Slide


def naive(slide: Slide, windows, size: int, mpp: float, reader=None) -> list[np.ndarray]:
    """One `read_region` per patch with tiffslide (or `reader`, e.g. an OpenSlide) at the best level."""
    level = slide.best_level(mpp)
    ds = slide.level_downsamples[level]
    reader = reader or slide._slide
    out = []
    for w in windows:
        side = round(w.size0 / ds)
        region = reader.read_region((w.x, w.y), level, (side, side)).convert("RGB")
        out.append(np.asarray(region.resize((size, size), Image.Resampling.BILINEAR) if side != size else region))
    return out


def open_openslide(path: Path, levels: int):
    """An OpenSlide of `path`, or the reason it cannot stand in for tiffslide here."""
    try:
        import openslide
    except ImportError:
        return None, "openslide-python is not installed (pip install -e .[bench])"
    try:
        reader = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as err:
        return None, f"OpenSlide cannot open it ({err})"
    if reader.level_count != levels:
        return None, f"OpenSlide sees {reader.level_count} level(s), tiffslide {levels}"
    return reader, None


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


def mean_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b, strict=True)]))


def run_case(label: str, path: Path, mpp: float, size: int, repeats: int) -> dict:
    with Slide(path) as slide:
        size0 = slide.level0_size(size, mpp)
        windows = grid_windows(slide.dimensions, size0, size0)
        t_naive, a = best_of(naive, repeats, slide, windows, size, mpp)
        t_ours, b = best_of(ours, repeats, slide, windows, size, mpp)
        reader, why_not = open_openslide(path, len(slide.level_dimensions))
        if reader is not None:
            t_openslide, c = best_of(naive, repeats, slide, windows, size, mpp, reader)
            reader.close()
    n = len(windows)
    row = {"case": label, "patches": n, "size": size, "mpp": mpp, "tiffslide_patches_per_s": n / t_naive,
           "ours_patches_per_s": n / t_ours, "ratio": t_naive / t_ours, "pixel_diff_tiffslide": mean_difference(a, b)}
    print(f"{label}: {n} patches of {size} px at {mpp} µm/px, best of {repeats}")
    print(f"  tiffslide read_region per patch : {n / t_naive:8.1f} patches/s")
    if reader is not None:
        row.update({"openslide_patches_per_s": n / t_openslide, "openslide_ratio": t_openslide / t_ours,
                    "pixel_diff_openslide": mean_difference(c, b)})
        print(f"  OpenSlide read_region per patch : {n / t_openslide:8.1f} patches/s")
    else:
        row["openslide"] = why_not
        print(f"  OpenSlide                       : not compared: {why_not}")
    print(f"  htd-toolkit block reader        : {n / t_ours:8.1f} patches/s")
    print(f"  ratio to tiffslide              : {row['ratio']:8.2f}x  (mean |pixel diff| {row['pixel_diff_tiffslide']:.2f})")
    if reader is not None:
        print(f"  ratio to OpenSlide              : {row['openslide_ratio']:8.2f}x  "
              f"(mean |pixel diff| {row['pixel_diff_openslide']:.2f})")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slide", type=Path)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.slide:
        print(json.dumps({"cases": [run_case(args.slide.name, args.slide, args.mpp, args.patch_size, args.repeats)]}))
        return
    svs = sample_slide_path()
    rows = [run_case("CC0 sample .svs (240-px JPEG tiles, one level)", svs, args.mpp, args.patch_size, args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        pyramid = write_slide_region(svs, Path(tmp) / "cc0.tif", compression="jpeg", tile=240)
        rows.append(run_case("CC0 sample as a JPEG pyramid, level 1", pyramid, args.mpp * 2, args.patch_size,
                             args.repeats))
        mosaic = write_mosaic(svs, Path(tmp) / "mosaic.tif")  # nine times larger, tiled as scanners do
        rows.append(run_case("3x3 mosaic of the CC0 sample (JPEG, 240-px tiles)", mosaic, args.mpp, args.patch_size,
                             args.repeats))
    print(json.dumps({"cases": rows}))


if __name__ == "__main__":
    main()
