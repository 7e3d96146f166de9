"""Background stays glass: where the map says background (class 0) the pixels are real glass, tiles of the
model's glass bank (its training slides' background), in patches and in whole slides; in slides the glass
follows the mask's outline at full resolution, and tissue does not turn to glass.

The rule for "looks like glass" (`looks_like_glass`: bright and unstained) is the one the docs measure
real and generated patches with; the reference for the outline is the map itself.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from htd_toolkit.base.shipped import shipped_adapter_model
from htd_toolkit.errors import InputError, UserError
from htd_toolkit.generate.slide import SlideGlass, SlideOptions, generate_slide
from htd_toolkit.models.background import (
    GLASS_BANK,
    GlassBank,
    glass_for,
    glass_shares,
    looks_like_glass,
    square_cells,
    with_flips,
)
from htd_toolkit.models.pipeline import HTDPipeline
from htd_toolkit.testing.slides import FIDELITY_FIXTURE, fixture_crop_bank


@pytest.fixture(scope="module")
def pipe():
    return HTDPipeline.from_pretrained(shipped_adapter_model())


def bank_cells(bank: GlassBank) -> set[bytes]:
    """Every tile of `bank` in each of its flips, as bytes (H, W, 3)."""
    variants = with_flips(bank.tiles.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    return {v.tobytes() for v in variants}


def background_cells_are_bank_tiles(images: np.ndarray, maps: np.ndarray, bank: GlassBank) -> float:
    """The share of the images' wholly-background bank-sized cells that are one of the bank's tiles, pixel for pixel."""
    known = bank_cells(bank)
    cells = square_cells(images, bank.side)[square_cells(maps == 0, bank.side).all(axis=(3, 4))]
    assert len(cells)
    return float(np.mean([np.ascontiguousarray(c).tobytes() in known for c in cells]))


def fixture_patches(count: int, glass_columns: int):
    with np.load(FIDELITY_FIXTURE) as data:
        maps, crops, classes = data["maps"][:count].copy(), data["crops"][:count], data["crop_classes"][:count]
    maps[:, :, :glass_columns] = 0
    given = [{int(c): crop for c, crop in zip(row, pair, strict=True) if c and (m == c).any()}
             for row, pair, m in zip(classes, crops, maps, strict=True)]
    return maps, given


def test_generated_background_is_the_banks_real_glass_and_tissue_stays_the_models(pipe):
    maps, given = fixture_patches(8, 24)  # a third of every patch is glass by the map
    runs = {keep: pipe(semantic_map=list(maps), crops=given, num_inference_steps=10, output_type="np",
                       generator=pipe.seeded(list(range(8))), keep_glass=keep).images for keep in (False, True)}
    bank = pipe.model.glass_bank
    assert bank.recorded and len(bank.tiles) > 100
    real = bank.tiles.numpy()
    free_background, free_tissue, free_inner = glass_shares(runs[False], maps)
    background, tissue, inner = glass_shares(runs[True], maps)
    # real glass, not a flat colour: as much of it looks like glass as of the bank, with the bank's texture
    assert background > free_background and abs(background - looks_like_glass(real).mean()) < 0.1
    spread, real_spread = runs[True][maps == 0].astype(float).std(0), real.reshape(-1, 3).astype(float).std(0)
    assert np.all(np.abs(spread - real_spread) < 0.25 * real_spread)
    assert background_cells_are_bank_tiles(runs[True], maps, bank) == 1.0
    # every background pixel is its sample's canvas's (drawn from its generator after the steps), at
    # full resolution, also in latent cells that straddle the tissue's edge: the tissue's edge is the mask's
    generators = pipe.seeded(list(range(8)))
    for generator in generators:
        pipe.prepare_latents(1, 64, 64, generator)
    canvas = glass_for(pipe.glass_tiles, torch.from_numpy(maps), generators).pixels.permute(0, 2, 3, 1).numpy()
    is_canvas = (runs[True] == canvas).all(-1)
    assert is_canvas[maps == 0].all() and is_canvas[maps > 0].mean() < 0.01
    # whitening everything is not the fix: the tissue is the model's own, pixel for pixel, up to the mask's edge
    assert np.array_equal(runs[True][maps > 0], runs[False][maps > 0])
    assert (tissue, inner) == (free_tissue, free_inner)


def test_glass_is_pasted_in_pixels_so_latent_output_is_refused_with_it(pipe):
    maps, given = fixture_patches(1, 24)
    with pytest.raises(InputError, match="keep_glass pastes real glass into the decoded pixels, and "
                                         "output_type='latent' has none"):
        pipe(semantic_map=list(maps), crops=given, num_inference_steps=1, output_type="latent", keep_glass=True)


def test_each_samples_glass_comes_from_its_own_generator(pipe):
    maps, given = fixture_patches(3, 32)

    def glass(seeds, index):
        images = pipe(semantic_map=list(maps[index]), crops=[given[i] for i in index], num_inference_steps=1,
                      output_type="np", generator=pipe.seeded(seeds), keep_glass=True).images
        return [image[labels == 0] for image, labels in zip(images, maps[index], strict=True)]

    batch = glass([0, 1, 2], [0, 1, 2])
    alone = glass([1], [1])
    assert np.array_equal(batch[1], alone[0])  # a sample's glass does not depend on its batch
    assert not np.array_equal(glass([5], [1])[0], alone[0])  # another seed, other tiles


def test_keep_glass_leaves_the_tissue_of_a_scheduler_that_draws_noise_the_models():
    """DDPM draws noise from the generator at every step: the canvas is drawn after the steps, or keeping the
    glass would change the tissue."""
    ddpm = HTDPipeline.from_pretrained(shipped_adapter_model(), scheduler="ddpm")
    maps, given = fixture_patches(1, 24)
    runs = {keep: ddpm(semantic_map=list(maps), crops=given, num_inference_steps=2, output_type="np",
                       generator=ddpm.seeded([0]), keep_glass=keep).images for keep in (False, True)}
    assert np.array_equal(runs[True][maps > 0], runs[False][maps > 0])


@pytest.mark.parametrize("tissue_side", [0, 8, 32])
def test_a_map_that_is_mostly_glass_is_the_banks_glass(pipe, tissue_side):
    with np.load(FIDELITY_FIXTURE) as data:
        crop = data["crops"][0, 0]
    labels = np.zeros((64, 64), np.uint8)
    labels[:tissue_side, :tissue_side] = 1
    image = pipe(semantic_map=labels, crops={1: crop} if tissue_side else None, num_inference_steps=4,
                 output_type="np", generator=pipe.seeded([0]), keep_glass=True).images[0]
    assert background_cells_are_bank_tiles(image[None], labels[None], pipe.model.glass_bank) == 1.0


def test_a_model_folder_without_a_glass_bank_loads_and_keeps_its_flat_glass_colour(tmp_path, caplog):
    folder = tmp_path / "older"
    shutil.copytree(shipped_adapter_model(), folder)
    (folder / GLASS_BANK).unlink()
    older = HTDPipeline.from_pretrained(folder)
    assert older.model.glass_bank is None
    with caplog.at_level(logging.WARNING, logger="htd_toolkit.models.background"):
        image = older(semantic_map=np.zeros((64, 64), np.uint8), num_inference_steps=2, output_type="np",
                      generator=older.seeded([0]), keep_glass=True).images[0]
    assert np.abs(image.astype(int) - older.htd_config.glass).max() <= 1
    assert "no glass bank" in caplog.text and GLASS_BANK in caplog.text
    assert "glass throughout (95 % of pixels" in caplog.text  # not only older folders: data without such glass too


def test_a_broken_glass_bank_is_one_line_naming_it(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "broken"
    shutil.copytree(shipped_adapter_model(), folder)
    save_file({"tiles": torch.zeros(4, 16, 16, 3)}, folder / GLASS_BANK)  # floats, not pixels
    with pytest.raises(UserError, match=f"{GLASS_BANK}: expected a tensor 'tiles' of square RGB uint8"):
        HTDPipeline.from_pretrained(folder)


def curved_map(side: int) -> np.ndarray:
    """A full-resolution map whose glass is a diagonal channel and a disc, edges off every grid."""
    rows, columns = np.mgrid[:side, :side]
    labels = np.where(columns < side // 2, 1, 3).astype(np.uint8)
    labels[np.abs(rows - columns - 7) < 9] = 0
    labels[(rows - 110) ** 2 + (columns - 45) ** 2 < 23 ** 2] = 0
    return labels


def test_slide_glass_follows_a_curved_mask_at_full_resolution(tmp_path, pipe):
    import tiffslide

    from tests.test_benchmarks import load

    labels = curved_map(160)
    Image.fromarray(labels).save(tmp_path / "map.png")
    options = SlideOptions(model=str(shipped_adapter_model()), map=tmp_path / "map.png", out=tmp_path / "slide.tif",
                           crop_bank=fixture_crop_bank(tmp_path / "bank"), map_mpp=1.0, steps=2, batch_size=16,
                           compression="zlib", keep_glass=True)
    made = generate_slide(options)
    assert made["windows"]["side"] == 64 and made["size"] == [160, 160]
    with tiffslide.TiffSlide(options.out) as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
    canvas = SlideGlass(pipe.glass_tiles, options.seed, 192).pixels(0, 160)[:, :160]
    is_canvas = (image == canvas).all(-1)
    background = labels == 0
    # the glass is the bank's, pixel for pixel, exactly where the full-resolution mask is background
    assert is_canvas[background].all() and is_canvas[~background].mean() < 0.01
    scores = load("glass").outline_scores(image, labels, canvas, 64, 48)
    assert scores["outline_iou_given"] >= 0.95 and scores["background_is_canvas"] == 1.0


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


def test_the_recipe_records_the_training_glass_and_the_model_loads_it(model_dir, prepared):
    from htd_toolkit.evaluate.sets import load_set

    train = load_set(prepared, "train", limit=512)
    expected = GlassBank.from_images(train.images, train.masks)
    assert expected is not None and (model_dir / GLASS_BANK).is_file()
    loaded = HTDPipeline.from_pretrained(model_dir).model.glass_bank
    assert loaded.recorded and torch.equal(loaded.tiles, expected.tiles)
