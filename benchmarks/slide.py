"""`generate-slide` against the naive way: time and peak memory per megapixel, and seams.

Naive: cut the slide's map into non-overlapping tiles, generate each with `HTDPipeline` (the same model,
DDIM steps, guidance and crops) and paste the tiles into one image held in memory. Ours: overlapping
windows blended at every step, latents and pixels on disk, pyramids streamed (`generate_slide`).
Each run is a child process; its working memory is its peak resident memory (sampled every 5 ms) above
what it holds once the model is loaded. The seam metric (`evaluate.seams.seam_ratio`) is the gradient
energy across tile borders over the energy at the same phase elsewhere: 1.0 is seamless. The maps are all tissue (no window is skipped, so no
glass edge lies on a window border) with class edges off the borders' grid.

    python benchmarks/slide.py [--figure docs/slide_seams.png]   # CPU: 512 and 1,024 px slides (4x the area)
    python benchmarks/slide.py --shape toy     # seconds: proves it runs

The shipped H&E adapter model (64 px windows, 1 µm/px) and maps/crops from the fidelity fixture.
Ends with one JSON line holding the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHAPES = {"cpu": dict(sides=(512, 1024), steps=4), "toy": dict(sides=(128, 256), steps=1)}
OVERLAP = 16
FIGURE_BOX = np.s_[96:224, 96:224]  # 128 px across several window borders of both ways


class PeakMemory:
    """Peak resident memory of this process, sampled from /proc every 5 ms (ru_maxrss cannot be reset)."""

    def __init__(self):
        self.peak, self.running = self.now(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    @staticmethod
    def now() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, self.now())


def write_map(path: Path, side: int) -> Path:
    """A side x side map at the slide's resolution: all tissue (every window denoised, so no glass edge lies
    on a window border), cells of 16 px whose edges sit 7 px off the 16-px grid the window borders lie on."""
    from PIL import Image

    from htd_toolkit.testing.slides import fixture_grid

    grid = fixture_grid(side // 16, seed=side, background=False)
    Image.fromarray(np.roll(np.kron(grid, np.ones((16, 16), np.uint8)), 7, axis=(0, 1))).save(path)
    return path


def tile_borders(side: int, tile: int, starts: list[int]) -> list[int]:
    return sorted({b for s in starts for b in (s, s + tile) if 0 < b < side})


def run_ours(side: int, steps: int, work: Path, bank: Path, map_path: Path) -> dict:
    import tiffslide

    from htd_toolkit.base.shipped import shipped_adapter_model
    from htd_toolkit.evaluate.seams import seam_ratio
    from htd_toolkit.generate.slide import SlideOptions, generate_slide, window_starts
    from htd_toolkit.models.pipeline import HTDPipeline

    HTDPipeline.from_pretrained(shipped_adapter_model())  # loaded once before, so the baseline holds the model
    baseline = PeakMemory.now()
    memory = PeakMemory()
    start = time.perf_counter()
    made = generate_slide(SlideOptions(model=str(shipped_adapter_model()), map=map_path, out=work / "ours.tif",
                                       crop_bank=bank, map_mpp=1.0, steps=steps, overlap=OVERLAP, batch_size=16,
                                       compression="zlib", overwrite=True))
    seconds, peak = time.perf_counter() - start, memory.stop()
    with tiffslide.TiffSlide(work / "ours.tif") as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
    tile = made["windows"]["side"]
    starts = [s * 4 for s in window_starts(side // 4, tile // 4, (tile - OVERLAP) // 4)]
    borders = tile_borders(side, tile, starts)
    np.save(work / f"ours{side}.npy", image[FIGURE_BOX])
    return {"seconds": seconds, "working_mb": (peak - baseline) / 2**20,
            "seam_ratio": seam_ratio(image, borders, borders, period=4)}


def run_naive(side: int, steps: int, work: Path, bank: Path, map_path: Path) -> dict:
    import torch
    from PIL import Image

    from htd_toolkit.base.shipped import shipped_adapter_model
    from htd_toolkit.data.sources import CropBank
    from htd_toolkit.evaluate.seams import seam_ratio
    from htd_toolkit.generate.slide import SlideMap, draw_crops
    from htd_toolkit.models.pipeline import HTDPipeline
    from htd_toolkit.wsi.pyramid import write_pyramidal_tiff

    pipe = HTDPipeline.from_pretrained(shipped_adapter_model(), scheduler="ddim")
    baseline = PeakMemory.now()
    memory = PeakMemory()
    start = time.perf_counter()
    slide_map = SlideMap(np.asarray(Image.open(map_path)), 1)
    crops, _ = draw_crops(CropBank(bank), slide_map.tissue_classes(), {}, 0)
    tile = pipe.htd_config.resolution
    image = np.zeros((side, side, 3), np.uint8)
    corners = [(top, left) for top in range(0, side, tile) for left in range(0, side, tile)]
    with torch.no_grad():
        for first in range(0, len(corners), 16):
            chunk = corners[first:first + 16]
            maps = [slide_map.window(top, left, tile, tile) for top, left in chunk]
            out = pipe(semantic_map=maps, crops=[crops] * len(chunk), num_inference_steps=steps, output_type="np",
                       generator=pipe.seeded([first + i for i in range(len(chunk))]))
            for (top, left), tile_image in zip(chunk, out.images, strict=True):
                image[top:top + tile, left:left + tile] = tile_image
    write_pyramidal_tiff(work / "naive.tif", image, 1.0)
    seconds, peak = time.perf_counter() - start, memory.stop()
    borders = tile_borders(side, tile, list(range(0, side, tile)))
    np.save(work / f"naive{side}.npy", image[FIGURE_BOX])
    return {"seconds": seconds, "working_mb": (peak - baseline) / 2**20,
            "seam_ratio": seam_ratio(image, borders, borders, period=4)}


def child(args) -> None:
    from htd_toolkit.cli import quiet_libraries

    quiet_libraries()
    run = run_ours if args.child == "ours" else run_naive
    print(json.dumps(run(args.side, args.steps, args.work, args.bank, args.map)))


def measure(way: str, side: int, steps: int, work: Path, bank: Path, map_path: Path) -> dict:
    command = [sys.executable, __file__, "--child", way, "--side", str(side), "--steps", str(steps),
               "--work", str(work), "--bank", str(bank), "--map", str(map_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{way} at {side} px failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--figure", type=Path, help="write the same 128-px region of both ways, side by side, here")
    parser.add_argument("--child", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bank", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--map", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from PIL import Image

    from htd_toolkit.testing.slides import fixture_crop_bank

    shape = SHAPES[args.shape]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bank = fixture_crop_bank(root)
        for side in shape["sides"]:
            map_path = write_map(root / f"map{side}.png", side)
            row = {"side": side, "megapixels": side * side / 1e6}
            for way in ("ours", "naive"):
                figures = measure(way, side, shape["steps"], root, bank, map_path)
                row.update({f"{way}_{k}": v for k, v in figures.items()})
            rows.append(row)
        if args.figure:
            panels = [np.load(root / f"{way}{shape['sides'][-1]}.npy") for way in ("ours", "naive")]
            gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
            picture = Image.fromarray(np.concatenate([panels[0], gap, panels[1]], axis=1))
            picture.resize((picture.width * 3, picture.height * 3), Image.Resampling.NEAREST).save(args.figure)
    print("| slide | ours s/MP | naive s/MP | time ratio (naive/ours) | ours working MB | naive working MB "
          "| seams ours | seams naive |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mp = r["megapixels"]
        print(f"| {r['side']} px | {r['ours_seconds'] / mp:.1f} | {r['naive_seconds'] / mp:.1f} | "
              f"{r['naive_seconds'] / r['ours_seconds']:.2f}x | {r['ours_working_mb']:.0f} | "
              f"{r['naive_working_mb']:.0f} | {r['ours_seam_ratio']:.3f} | {r['naive_seam_ratio']:.3f} |")
    growth = {way: rows[-1][f"{way}_working_mb"] / max(rows[0][f"{way}_working_mb"], 1e-9) for way in ("ours", "naive")}
    area = rows[-1]["megapixels"] / rows[0]["megapixels"]
    print(f"working memory growth for {area:.0f}x the area: ours {growth['ours']:.2f}x, naive {growth['naive']:.2f}x")
    print(json.dumps({"benchmark": "slide", "shape": args.shape, "steps": shape["steps"], "rows": rows,
                      "memory_growth": growth, "area_growth": area}))


if __name__ == "__main__":
    main()
