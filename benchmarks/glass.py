"""Is the map's background glass? Real patches against generated ones, with and without `keep_glass`.

The check an independent reviewer ran, with one rule for real and generated pixels (`looks_like_glass`:
mean of R, G, B at least 200 and HSV saturation at most 25):

1. patches: the held-out CC0 region of the fidelity benchmark (`benchmarks/fidelity.py`'s preparation),
   its real patches against the shipped adapter model's images for the same maps and held-out crops;
   the share of background pixels (class 0) that look like glass, of tissue pixels that do, and of
   tissue pixels more than 4 px (one latent cell) from the background;
2. a whole slide (`generate-slide`) from the held-out pseudo-maps tiled into a slide-sized map, with a glass
   corner and a glass channel through tissue: the same shares, the IoU with the mask's background at the
   slide's resolution of the glass pixels and of the glass region (at the map's scale: glass pixels less
   the areas smaller than one 16-px map cell, pale specks in tissue, plus the holes smaller than one, dust
   on the glass), the same within 16 px of the mask's outline only (where a window grid would show), and
   the share of the region's edge pixels that lie on the window grid but away from any mask edge, beside
   the share of all pixels away from a mask edge that lie on it (chance). `*_given` compares the region
   with the glass the mask's background was given instead (the model's glass-bank canvas of the slide,
   where the mask is background; 1.0 when the glass is exactly there, whatever its texture), and
   `background_is_canvas` is the share of background pixels that are the canvas's exactly.

    python benchmarks/glass.py --out runs/glass              # CPU: about 15 minutes on 2 cores
    python benchmarks/glass.py --out /tmp/glass --shape toy  # seconds: proves it runs

Writes OUT/glass.json and prints the table docs/fidelity.md quotes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion

sys.path.append(str(Path(__file__).resolve().parent))  # after site-packages: benchmarks/evaluate.py must not shadow HF evaluate

SHAPES = {"cpu": dict(patches=None, steps=20, slide_cells=48, slide_steps=20),
          "toy": dict(patches=8, steps=2, slide_cells=12, slide_steps=2)}


def fractions(images: np.ndarray, masks: np.ndarray) -> dict:
    from htd_toolkit.models.background import glass_shares

    shares = glass_shares(images, masks)
    return {**dict(zip(("background_glass", "tissue_glass", "inner_tissue_glass"), (round(v, 4) for v in shares),
                       strict=True)),
            "background_share": round(float((masks == 0).mean()), 4)}


def patches(heldout: Path, shape: dict) -> dict:
    from htd_toolkit.base.shipped import shipped_adapter_model
    from htd_toolkit.classes import names_by_index
    from htd_toolkit.data.sources import CropBank
    from htd_toolkit.evaluate.sets import load_set
    from htd_toolkit.models.pipeline import HTDPipeline

    real = load_set(heldout, "train", limit=shape["patches"])
    pipe = HTDPipeline.from_pretrained(shipped_adapter_model())
    bank = CropBank(heldout / "crop_bank")
    names = names_by_index(pipe.htd_config.classes)
    rng = np.random.default_rng(0)
    crops = []
    for labels in real.masks:
        present = [int(c) for c in np.unique(labels) if 0 < c < 255 and c in bank.by_class]
        crops.append(bank.draw_crops(present, rng, names)[0])
    results = {"real": fractions(real.images, real.masks)}
    for keep in (False, True):
        started = time.perf_counter()
        images = np.concatenate([
            pipe(semantic_map=list(real.masks[i:i + 32]), crops=crops[i:i + 32], num_inference_steps=shape["steps"],
                 generator=pipe.seeded(list(range(i, min(i + 32, len(crops))))), output_type="np",
                 keep_glass=keep).images for i in range(0, len(crops), 32)])
        results["keep_glass" if keep else "model_only"] = {**fractions(images, real.masks),
                                                           "seconds": round(time.perf_counter() - started, 1)}
        if keep:
            Image.fromarray(np.concatenate([np.concatenate(list(real.images[:8]), 1), np.concatenate(list(images[:8]), 1)])
                            ).save(heldout.parent / "glass_patches.png")
    return results


def without_specks(pixels: np.ndarray, min_area: int) -> np.ndarray:
    """`pixels` less its connected areas smaller than `min_area` px."""
    from scipy.ndimage import label

    labels, _ = label(pixels)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def glass_region(glass: np.ndarray, min_area: int = 256) -> np.ndarray:
    """The glass as a region at the map's scale: glass pixels less the areas smaller than one 16-px map cell
    (pale specks inside tissue), plus the holes smaller than one (dust on the glass)."""
    return ~without_specks(~without_specks(glass, min_area), min_area)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return round(float((a & b).sum() / max(1, (a | b).sum())), 4)


def outline_scores(image: np.ndarray, mask: np.ndarray, canvas: np.ndarray, tile: int, stride: int) -> dict:
    """IoU of the glass with the mask's background (every glass pixel, the glass region, and the glass region
    within one 16-px map cell of the mask's outline, where a window grid would show) and with the glass
    the background was given (the `canvas`'s glass pixels there), and the share of glass-region edge pixels on
    the window grid (within 1 px of a window border) more than 4 px from any edge of the mask, beside the share
    of all pixels more than 4 px from a mask edge that lie on it (what edges placed by chance would give)."""
    from htd_toolkit.models.background import looks_like_glass

    background = mask == 0
    pixels = looks_like_glass(image)
    given = looks_like_glass(canvas) & background
    glass = glass_region(pixels)
    glass_edge = glass ^ binary_erosion(glass)
    mask_edge = binary_dilation(background ^ binary_erosion(background), iterations=4)
    grid = np.zeros_like(glass)
    for start in range(0, mask.shape[0], stride):
        for offset in (start - 1, start, start + tile - 1, start + tile):
            if 0 <= offset < mask.shape[0]:
                grid[offset, :] = grid[:, offset] = True
    on_grid = glass_edge & grid & ~mask_edge
    chance = (grid & ~mask_edge).sum() / max(1, (~mask_edge).sum())
    band = binary_dilation(background ^ binary_erosion(background, border_value=1), iterations=16)
    return {"pixel_iou": iou(pixels, background), "outline_iou": iou(glass, background),
            "outline_band_iou": iou(glass & band, background & band),
            "pixel_iou_given": iou(pixels, given), "outline_iou_given": iou(glass, glass_region(given)),
            "background_is_canvas": round(float((image == canvas).all(-1)[background].mean()), 4),
            "glass_edge_on_grid_not_mask": round(float(on_grid.sum() / max(1, glass_edge.sum())), 4),
            "grid_share_not_mask": round(float(chance), 4)}


def slide_canvas(model: Path, seed: int, shape: tuple[int, int], tile: int) -> np.ndarray:
    """The glass `generate-slide` gives a slide of `shape` px made with `seed` and windows of `tile` px."""
    from htd_toolkit.generate.slide import SlideGlass
    from htd_toolkit.models.pipeline import HTDPipeline

    pipe = HTDPipeline.from_pretrained(model)
    f = pipe.model.vae_scale_factor
    width = max(-(-shape[1] // f) * f, tile)  # the latent canvas's, as generate-slide plans it
    return SlideGlass(pipe.glass_tiles, seed, width).pixels(0, shape[0])[:, :shape[1]]


def slide(out: Path, heldout: Path, shape: dict) -> dict:
    import tiffslide

    from htd_toolkit.base.shipped import shipped_adapter_model
    from htd_toolkit.generate.slide import SlideOptions, generate_slide
    from htd_toolkit.testing.slides import fixture_grid

    cells = shape["slide_cells"]
    grid = fixture_grid(cells, seed=1, glass=cells // 4)  # a glass corner, and a glass channel through tissue
    grid[cells // 4:cells - cells // 8, cells // 2 + 1:cells // 2 + 4] = 0
    Image.fromarray(grid).save(out / "slide_map.png")
    mask = np.kron(grid, np.ones((16, 16), np.uint8))
    results = {}
    for keep in (False, True):
        options = SlideOptions(model=str(shipped_adapter_model()), map=out / "slide_map.png",
                               out=out / f"slide_{'glass' if keep else 'model'}.tif", crop_bank=heldout / "crop_bank",
                               map_mpp=16.0, steps=shape["slide_steps"], compression="zlib", keep_glass=keep,
                               overwrite=True)
        started = time.perf_counter()
        made = generate_slide(options)
        with tiffslide.TiffSlide(options.out) as opened:
            image = opened.read_region((0, 0), 0, opened.dimensions, as_array=True)
        windows = made["windows"]
        canvas = slide_canvas(shipped_adapter_model(), options.seed, image.shape[:2], windows["side"])
        results["keep_glass" if keep else "model_only"] = {
            **fractions(image[None], mask[None]),
            **outline_scores(image, mask, canvas, windows["side"], windows["side"] - windows["overlap"]),
            "seconds": round(time.perf_counter() - started, 1)}
    return results


def main(argv: list[str] | None = None) -> dict:
    import fidelity

    args, shape, _, heldout = fidelity.quality_run(__doc__, SHAPES, argv)
    results = {"patches": patches(heldout, shape), "slide": slide(args.out, heldout, shape), "shape": args.shape}
    (args.out / "glass.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
