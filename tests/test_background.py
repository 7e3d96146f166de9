"""Background stays glass: where the map says background (class 0) the pixels look like glass, in patches
and in whole slides, the glass follows the mask's outline, and tissue does not turn to glass.

The rule for "looks like glass" (`looks_like_glass`: bright and unstained) is the one the docs measure
real and generated patches with; the reference for the outline is the map itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from htd_toolkit.base.shipped import shipped_adapter_model
from htd_toolkit.generate.slide import SlideOptions, generate_slide
from htd_toolkit.models.background import background_cells, glass_shares, glass_weights, looks_like_glass
from htd_toolkit.models.pipeline import HTDPipeline
from htd_toolkit.testing.slides import FIDELITY_FIXTURE, fixture_crop_bank, fixture_grid


def test_weights_are_one_on_background_cells_and_ramp_to_tissue():
    class_map = torch.zeros(1, 16, 32, dtype=torch.long)
    class_map[0, :, 16:] = 2
    class_map[0, 5, 3] = 1  # one tissue pixel makes its whole latent cell the model's
    weights = glass_weights(background_cells(class_map, 4), edge=2)[0, 0]
    assert weights.shape == (4, 8)
    assert torch.all(weights[:, 4:] == 0)  # tissue
    assert torch.all(weights[:, 3] == 0.5) and torch.all(weights[3, :3] == 1)  # one cell from tissue: half
    assert weights[1, 0] == 0 and weights[0, 0] == weights[1, 1] == weights[2, 1] == 0.5 and weights[0, 2] == 1


@pytest.fixture(scope="module")
def pipe():
    return HTDPipeline.from_pretrained(shipped_adapter_model())


def test_generated_background_looks_like_glass_and_tissue_does_not(pipe):
    with np.load(FIDELITY_FIXTURE) as data:
        maps, crops, classes = data["maps"][:8].copy(), data["crops"][:8], data["crop_classes"][:8]
    maps[:, :, :24] = 0  # a third of every patch is glass by the map
    given = [{int(c): crop for c, crop in zip(row, pair, strict=True) if c and (m == c).any()}
             for row, pair, m in zip(classes, crops, maps, strict=True)]
    runs = {keep: pipe(semantic_map=list(maps), crops=given, num_inference_steps=10, output_type="np",
                       generator=pipe.seeded(list(range(8))), keep_glass=keep).images for keep in (False, True)}
    free_background, free_tissue, free_inner = glass_shares(runs[False], maps)
    background, tissue, inner = glass_shares(runs[True], maps)
    assert background >= 0.95 > free_background
    # whitening everything is not the fix: tissue beyond one latent cell of the glass is as before, and
    # overall (a third of each patch is glass here, so the edge is long) it rises by a few points at most
    assert inner <= free_inner + 0.02 and tissue <= free_tissue + 0.05


def test_slide_glass_follows_the_mask_not_the_window_grid(tmp_path):
    bank = fixture_crop_bank(tmp_path / "bank")
    grid = fixture_grid(24, seed=2)
    grid[4:20, 9:11] = 0  # a glass channel, 32 px wide, through tissue windows
    Image.fromarray(grid).save(tmp_path / "map.png")
    made = {}
    for keep in (False, True):
        options = SlideOptions(model=str(shipped_adapter_model()), map=tmp_path / "map.png",
                               out=tmp_path / f"slide_{keep}.tif", crop_bank=bank, map_mpp=16.0, steps=4,
                               batch_size=16, compression="zlib", keep_glass=keep)
        generate_slide(options)
        import tiffslide

        with tiffslide.TiffSlide(options.out) as slide:
            made[keep] = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
    mask = np.kron(grid, np.ones((16, 16), np.uint8))
    free_background, free_tissue, free_inner = glass_shares(made[False], mask)
    background, tissue, inner = glass_shares(made[True], mask)
    assert background >= 0.95 > free_background
    assert inner <= free_inner + 0.02 and tissue <= free_tissue + 0.05
    channel = looks_like_glass(made[True][64:320, 144:176])
    assert channel.mean() >= 0.95  # the channel is glass along its whole length, across window borders


def test_generate_keeps_glass_unless_told_not_to(model_dir, prepared, tmp_path, capsys):
    from htd_toolkit.evaluate.sets import load_set
    from tests.helpers import run_cli
    from tests.test_generate import gen_args

    images = {}
    for flag in ("--keep-glass", "--no-keep-glass"):
        out = tmp_path / flag
        code, _, err = run_cli(gen_args(model_dir, prepared, out, 4, flag), capsys)
        assert code == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["keep_glass"] is (flag == "--keep-glass")
        images[flag] = load_set(out)
    kept, free = images["--keep-glass"], images["--no-keep-glass"]
    background = kept.masks == 0
    assert background.any() and np.array_equal(kept.masks, free.masks)
    assert not np.array_equal(kept.images[background], free.images[background])


@pytest.mark.parametrize("tissue_side", [0, 8, 32])
def test_a_map_that_is_mostly_glass_is_glass(pipe, tissue_side):
    """The shipped toy VAE decodes its own encoding of glass pink; the glass colour is restored in pixels."""
    with np.load(FIDELITY_FIXTURE) as data:
        crop = data["crops"][0, 0]
    labels = np.zeros((64, 64), np.uint8)
    labels[:tissue_side, :tissue_side] = 1
    image = pipe(semantic_map=labels, crops={1: crop} if tissue_side else None, num_inference_steps=4,
                 output_type="np", generator=pipe.seeded([0]), keep_glass=True).images[0]
    assert looks_like_glass(image)[labels == 0].mean() >= 0.99
    assert np.abs(image[labels == 0].astype(float).mean(0) - pipe.htd_config.glass).max() < 3
