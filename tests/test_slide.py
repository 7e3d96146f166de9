"""`generate-slide`: whole synthetic slides whose mask, regions and pyramid are exact, without seams.

The model is the HTD model shipped in the package (64 px windows at 1 µm/px, f = 4); the maps are
made from the held-out CC0 maps of the fidelity fixture, the crops from its held-out crops.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiffslide
from huggingface_hub import HfApi
from matplotlib.path import Path as PolygonPath
from PIL import Image
from scipy.ndimage import binary_erosion

from htd_toolkit.base.shipped import shipped_adapter_model
from htd_toolkit.classes import ClassSpec
from htd_toolkit.data.slide_files import SlideFiles
from htd_toolkit.errors import UserError
from htd_toolkit.evaluate.seams import seam_ratio
from htd_toolkit.generate import slide as slide_module
from htd_toolkit.generate.slide import SlideOptions, generate_slide, window_starts
from htd_toolkit.testing.hubserver import USER_TOKEN
from htd_toolkit.testing.slides import fixture_crop_bank, fixture_grid
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def crop_bank(tmp_path_factory) -> Path:
    return fixture_crop_bank(tmp_path_factory.mktemp("bank"))


def shipped_fingerprint() -> dict:
    from htd_toolkit.models.htd_model import HTDConfig

    return HTDConfig.load(shipped_adapter_model()).class_fingerprint


def test_a_pseudo_map_numbered_by_other_centroids_is_refused(tmp_path, crop_bank, capsys):
    from htd_toolkit.annotations.pseudo import write_assignment

    write_assignment(tmp_path / "slide.npz", fixture_grid(6, seed=7), 32, "0123456789abcdef")
    code, _, err = run_cli(["generate-slide", "--model", str(shipped_adapter_model()), "--map",
                            str(tmp_path / "slide.npz"), "--map-mpp", "16", "--crop-bank", str(crop_bank), "--out",
                            str(tmp_path / "slide.tif"), "--steps", "1"], capsys)
    assert code == 1 and "0123456789abcdef" in err and shipped_fingerprint()["centroids"] in err
    assert not list(tmp_path.glob("slide.*.*")) and not (tmp_path / "slide.tif").exists()


def shipped_slide_glass(seed: int, width: int) -> np.ndarray:
    """The glass (`SlideGlass`) the shipped model gives a slide `width` px wide made with `seed`, its first `width` rows."""
    from htd_toolkit.models.pipeline import HTDPipeline

    tiles = HTDPipeline.from_pretrained(shipped_adapter_model()).glass_tiles
    return slide_module.SlideGlass(tiles, seed, width).pixels(0, width)


def grid_map(path: Path, cells: int, **kwargs) -> Path:
    Image.fromarray(fixture_grid(cells, **kwargs)).save(path)
    return path


def options(tmp_path: Path, map_path: Path, bank: Path, name: str = "slide.tif", **kwargs) -> SlideOptions:
    settings = dict(map_mpp=16.0, steps=3, guidance=2.0, batch_size=16)
    settings = {"model": str(shipped_adapter_model()), **settings}
    return SlideOptions(map=map_path, out=tmp_path / name, crop_bank=bank, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def made(tmp_path_factory, crop_bank):
    root = tmp_path_factory.mktemp("slide")
    map_path = grid_map(root / "map.png", 24, glass=10)  # 384 x 384 px at 1 µm/px
    provenance = generate_slide(options(root, map_path, crop_bank))
    return root, map_path, provenance


def test_slide_and_mask_open_with_their_levels_and_mpp(made):
    import openslide

    root, map_path, provenance = made
    files = SlideFiles(root / "slide.tif")
    grid = np.asarray(Image.open(map_path))
    expected = np.kron(grid, np.ones((16, 16), np.uint8))
    assert provenance["size"] == [384, 384] and provenance["mpp"] == 1.0
    with tiffslide.TiffSlide(files.image) as slide:
        assert slide.dimensions == (384, 384)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(1.0)
        assert slide.level_count >= 2
        level0 = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
    with openslide.OpenSlide(str(files.image)) as slide:
        assert slide.level_count >= 2 and float(slide.properties["openslide.mpp-x"]) == pytest.approx(1.0)
    plan = slide_module.plan_windows(slide_module.SlideMap(grid, 16), 64, 16, 4)
    denoised = np.zeros((384, 384), bool)
    for top, lefts in plan.rows:
        for left in lefts:
            denoised[top * 4:top * 4 + 64, left * 4:left * 4 + 64] = True
    assert 0 < denoised.sum() < denoised.size and not (expected[~denoised] > 0).any()  # tissue is always denoised
    away = binary_erosion(~denoised, iterations=8)  # JPEG rings for a few pixels next to tissue
    own, another = (shipped_slide_glass(seed, 384).astype(int) for seed in (0, 1))
    telling = away & (np.abs(own - another).max(-1) > 40)  # where the two seeds' glass differs: dust (127 px)
    error, other = (np.abs(level0[telling].astype(int) - glass[telling]).mean() for glass in (own, another))
    assert telling.sum() > 50 and error < other / 3  # windows without tissue are never denoised: the glass bank's
    # tiles of the slide's seed (up to JPEG's error), not another seed's
    assert level0[denoised].mean() < 200  # where windows were denoised: stained tissue
    with tiffslide.TiffSlide(files.mask) as mask:
        for level, (width, height) in enumerate(mask.level_dimensions):
            step = 2 ** level
            read = mask.read_region((0, 0), level, (width, height), as_array=True)
            read = read[..., 0] if read.ndim == 3 else read
            assert np.array_equal(read, expected[::step, ::step][:height, :width]), level


def test_regions_rasterise_back_to_the_mask(made):
    root, map_path, _ = made
    grid = np.asarray(Image.open(map_path))
    expected = np.kron(grid, np.ones((16, 16), np.uint8))
    collection = json.loads(SlideFiles(root / "slide.tif").regions.read_text())
    names = {f["properties"]["classification"]["name"] for f in collection["features"]}
    assert names <= {"tissue type 001", "tissue type 002", "tissue type 003"} and names
    centres = np.stack(np.meshgrid(np.arange(384) + 0.5, np.arange(384) + 0.5), -1).reshape(-1, 2)
    drawn = np.zeros(384 * 384, np.uint8)
    for feature in collection["features"]:  # an independent rasteriser: pixel centres inside exterior, outside holes
        exterior, *holes = feature["geometry"]["coordinates"]
        inside = PolygonPath(exterior).contains_points(centres)
        for hole in holes:
            inside &= ~PolygonPath(hole).contains_points(centres)
        assert not (drawn[inside] > 0).any()  # regions do not overlap
        drawn[inside] = feature["properties"]["class_id"]
    assert np.array_equal(drawn.reshape(384, 384), expected)
    # and read back as prepare reads a QuPath export: classes by name, the same mask
    from htd_toolkit.annotations.geojson import GeoJSONAnnotations
    from htd_toolkit.base.shipped import shipped_adapter_model as model_path

    classes = [ClassSpec(c["index"], c["name"], c["color"])
               for c in json.loads((model_path() / "htd_config.json").read_text())["classes"]]
    source = GeoJSONAnnotations(SlideFiles(root / "slide.tif").regions, (384, 384), classes)
    assert np.array_equal(source.label_box((0, 0, 384, 384), 384, 384), expected)


def test_a_pseudo_map_from_prepare_unannotated_is_a_map(tmp_path, crop_bank):
    """The .npz `prepare unannotated` writes (a grid of tile clusters) drives a slide directly."""
    from htd_toolkit.annotations.pseudo import write_assignment

    grid = fixture_grid(6, seed=7)
    write_assignment(tmp_path / "slide.npz", grid, 32, shipped_fingerprint()["centroids"])
    made = generate_slide(options(tmp_path, tmp_path / "slide.npz", crop_bank, steps=1))
    assert made["map"]["size"] == [6, 6] and made["size"] == [96, 96]
    with tiffslide.TiffSlide(tmp_path / "slide.mask.tif") as mask:
        labels = mask.read_region((0, 0), 0, (96, 96), as_array=True)
    labels = labels[..., 0] if labels.ndim == 3 else labels
    assert np.array_equal(labels, np.kron(grid, np.ones((16, 16), np.uint8)))


def test_provenance_records_every_crop_and_option(made):
    root, map_path, provenance = made
    saved = json.loads(SlideFiles(root / "slide.tif").provenance.read_text())
    assert saved == provenance
    tissue = set(np.unique(np.asarray(Image.open(map_path)))) - {0}
    assert {c["class"] for c in saved["crops"]} == tissue and all(c["key"] for c in saved["crops"])
    assert saved["options"]["seed"] == 0 and saved["options"]["steps"] == 3 and saved["scheduler"] == "ddim"
    assert "map.png" not in json.dumps(saved)  # the map is named by its checksum only
    assert not SlideFiles(root / "slide.tif").work.exists()
    assert Image.open(SlideFiles(root / "slide.tif").thumbnail).size[0] > 384


def test_blended_windows_leave_no_seams_where_pasted_patches_do(tmp_path, crop_bank):
    # all tissue (every window denoised); class edges 7 px off the 16-px grid the window borders lie on, and
    # lossless pixels, so that neither class edges nor JPEG blocks sit on the borders the metric looks at
    grid = np.asarray(Image.open(grid_map(tmp_path / "cells.png", 20, seed=1, background=False)))
    map_path = tmp_path / "map.png"
    Image.fromarray(np.roll(np.kron(grid, np.ones((16, 16), np.uint8)), 7, axis=(0, 1))).save(map_path)
    ratios = {}
    for overlap in (32, 0):
        made = generate_slide(options(tmp_path, map_path, crop_bank, f"o{overlap}.tif", overlap=overlap, steps=6,
                                      map_mpp=1.0, compression="zlib"))
        with tiffslide.TiffSlide(tmp_path / f"o{overlap}.tif") as slide:
            image = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
        side, factor = made["windows"]["side"], 4
        starts = [s * factor for s in window_starts(320 // factor, side // factor, (side - overlap) // factor)]
        borders = sorted({b for s in starts for b in (s, s + side)})
        ratios[overlap] = seam_ratio(image, borders, borders, period=factor)
    assert 0.9 < ratios[32] < 1.05, ratios  # borders as smooth as the rest, within 5 %
    assert ratios[0] > 2 * ratios[32], ratios  # side-by-side patches: the metric sees their seams


def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, crop_bank, monkeypatch):
    map_path = grid_map(tmp_path / "map.png", 12, seed=2)
    generate_slide(options(tmp_path / "a", map_path, crop_bank, steps=4))
    original = slide_module.Denoiser.step

    def step_then_stop(self, index, advance=None):
        if index == 2:
            raise KeyboardInterrupt
        original(self, index, advance)

    monkeypatch.setattr(slide_module.Denoiser, "step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        generate_slide(options(tmp_path / "b", map_path, crop_bank, steps=4))
    assert json.loads((tmp_path / "b" / "slide.work" / "state.json").read_text()) == {"steps_done": 2}
    calls = []
    monkeypatch.setattr(slide_module.Denoiser, "step", lambda self, i, a=None: (calls.append(i), original(self, i, a)))
    generate_slide(options(tmp_path / "b", map_path, crop_bank, steps=4))
    assert calls == [2, 3]  # only the steps left
    for name in ("slide.tif", "slide.mask.tif", "slide.geojson", "slide.thumbnail.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bad_maps_and_options_are_one_line_errors(tmp_path, crop_bank, capsys):
    bad = tmp_path / "bad.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"bad.png: class id 7 is not one of the model's 4 classes"):
        generate_slide(options(tmp_path, bad, crop_bank))
    good = grid_map(tmp_path / "map.png", 8)
    with pytest.raises(UserError, match=r"map.png: its 10.0 µm per pixel is not a whole multiple"):
        generate_slide(options(tmp_path, good, crop_bank, map_mpp=10.0, mpp=3.0))
    with pytest.raises(UserError, match=r"--tile 62 and --overlap 16: both must be multiples of the VAE factor 4"):
        generate_slide(options(tmp_path, good, crop_bank, tile=62, overlap=16))
    with pytest.raises(UserError, match=r"--tile 100000: expected a finite number at least 8 and at most 4096"):
        generate_slide(options(tmp_path, good, crop_bank, tile=100_000, overlap=0))  # was a 9 GB mask
    code, _, err = run_cli(["generate-slide", "--model", str(shipped_adapter_model()), "--map", str(tmp_path / "no.png"),
                            "--out", str(tmp_path / "s.tif")], capsys)
    assert code != 0 and "no.png: file not found" in err and "Traceback" not in err


def test_a_slide_too_large_for_the_disk_is_refused_before_any_work(tmp_path, crop_bank, capsys, monkeypatch):
    map_path = grid_map(tmp_path / "map.png", 8)
    args = ["generate-slide", "--model", str(shipped_adapter_model()), "--map", str(map_path), "--crop-bank",
            str(crop_bank), "--out", str(tmp_path / "s.tif"), "--steps", "2"]
    code, _, err = run_cli([*args, "--map-mpp", "1e9"], capsys)  # a typo: 10^10 px a side
    assert code == 1 and "map.png: the slide would be 8,000,000,000 x 8,000,000,000 px" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s.work").exists()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    code, _, err = run_cli([*args, "--map-mpp", "16"], capsys)  # 128 x 128 px: about 150 kB
    assert code == 1 and "GB free" in err, err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=400_000))
    code, _, err = run_cli([*args, "--map-mpp", "16"], capsys)
    assert code == 0, err


def test_cli_makes_and_pushes_the_slide_set(tmp_path, crop_bank, capsys, monkeypatch):
    map_path = grid_map(tmp_path / "map.png", 8, seed=3)
    (tmp_path / "notes.txt").write_text("not part of the slide set")
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    args = ["generate-slide", "--model", str(shipped_adapter_model()), "--map", str(map_path), "--map-mpp", "16",
            "--crop-bank", str(crop_bank), "--out", str(tmp_path / "synthetic.tif"), "--steps", "2",
            "--push-to-hub", "user/synthetic-slide"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert out.strip().endswith("synthetic.tif") and "128 x 128 px at 1.0 µm/px" in err
    files = set(HfApi(token=USER_TOKEN).list_repo_files("user/synthetic-slide", repo_type="dataset"))
    assert files == {"README.md", "synthetic.tif", "synthetic.mask.tif", "synthetic.geojson", "synthetic.json",
                     "synthetic.thumbnail.png", ".gitattributes"} - ({".gitattributes"} - files)
    code, _, err = run_cli(args, capsys)  # made already: nothing generated again
    assert code == 0, err
    assert USER_TOKEN not in err + out


def test_a_2048_px_slide_from_cc0_pseudo_maps_opens_with_tiffslide(tmp_path, crop_bank):
    map_path = grid_map(tmp_path / "map.png", 128, seed=4, glass=48)  # held-out CC0 pseudo-maps, tiled
    made = generate_slide(options(tmp_path, map_path, crop_bank, steps=1, guidance=1.0, batch_size=32))
    assert made["windows"]["denoised"] < made["windows"]["all"]  # the glass corner is skipped
    with tiffslide.TiffSlide(tmp_path / "slide.tif") as slide:
        assert slide.dimensions == (2048, 2048) and slide.level_count == 4
        assert slide.level_downsamples == pytest.approx((1, 2, 4, 8))
        corner = slide.read_region((0, 0), 2, (128, 128), as_array=True)  # glass, read at level 2
        glass = shipped_slide_glass(0, 2048)[:512, :512].reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
        assert np.abs(corner - glass).mean() <= 6  # the glass bank's tiles, 4 x 4 pixels averaged (JPEG)
    with tiffslide.TiffSlide(tmp_path / "slide.mask.tif") as mask:
        assert mask.dimensions == (2048, 2048)


def test_two_processes_share_the_windows_of_every_step(tmp_path, crop_bank):
    import os
    import subprocess
    import sys

    map_path = grid_map(tmp_path / "map.png", 8, seed=5)
    single = generate_slide(options(tmp_path / "one", map_path, crop_bank, steps=2))
    launcher = Path(sys.executable).with_name("accelerate")
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_two_process.yaml"
    cmd = [str(launcher), "launch", "--config_file", str(config), "-m", "htd_toolkit.cli", "generate-slide",
           "--model", str(shipped_adapter_model()), "--map", str(map_path), "--map-mpp", "16", "--crop-bank",
           str(crop_bank), "--out", str(tmp_path / "two" / "slide.tif"), "--steps", "2", "--batch-size", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    made = json.loads((tmp_path / "two" / "slide.json").read_text())
    rows = slide_module.plan_windows(slide_module.SlideMap(np.asarray(Image.open(map_path)), 16), 64, 16, 4).rows
    expected = [2 * sum(len(lefts) for _, lefts in rows[rank::2]) for rank in (0, 1)]  # window rows alternate
    assert made["predictions_by_process"] == expected and all(expected)
    assert single["predictions_by_process"] == [sum(expected)]
    with tiffslide.TiffSlide(tmp_path / "one" / "slide.tif") as a, tiffslide.TiffSlide(tmp_path / "two" / "slide.tif") as b:
        one, two = (s.read_region((0, 0), 0, s.dimensions, as_array=True).astype(int) for s in (a, b))
    assert np.abs(one - two).mean() < 0.5 and np.abs(one - two).max() <= 8  # sums in another order (equal here)
    assert (tmp_path / "one" / "slide.mask.tif").read_bytes() == (tmp_path / "two" / "slide.mask.tif").read_bytes()


def test_a_real_slide_and_its_camelyon16_annotation_give_the_map(model_dir, prepared, cc0_pyramid, tmp_path, capsys):
    """--map SLIDE --annotation XML: the annotation drawn as prepare draws it, at --map-mpp; checked against
    the XML's polygons with an independent point-in-polygon test at every map cell's centre."""
    from tests.annotation_files import HOLE, TUMOUR, camelyon_slides

    root = camelyon_slides(cc0_pyramid, tmp_path / "c16", 1)
    args = ["generate-slide", "--model", str(model_dir), "--map", str(root / "slides" / "tumor_001.tif"),
            "--annotation", str(root / "ann" / "tumor_001.xml"), "--format", "camelyon16", "--map-mpp", "16",
            "--crop-bank", str(prepared / "crop_bank"), "--out", str(tmp_path / "s.tif"), "--steps", "1"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    with tiffslide.TiffSlide(tmp_path / "s.mask.tif") as mask:
        labels = mask.read_region((0, 0), 0, mask.dimensions, as_array=True)
    labels = labels[..., 0] if labels.ndim == 3 else labels
    with tiffslide.TiffSlide(cc0_pyramid) as source:
        width0, height0 = source.dimensions
    cells = labels[4::8, 4::8]  # 8 slide pixels (2 µm) per map cell (16 µm)
    rows, cols = cells.shape
    centres = np.stack(np.meshgrid((np.arange(cols) + 0.5) * width0 / cols,
                                   (np.arange(rows) + 0.5) * height0 / rows), -1).reshape(-1, 2)
    tumour = PolygonPath(TUMOUR).contains_points(centres) & ~PolygonPath(HOLE).contains_points(centres)
    assert tumour.sum() > 100 and np.array_equal(cells.reshape(-1) == 2, tumour)  # 2 = tumor
    assert ((cells == 1).sum() > 100)  # tissue outside the tumour: normal
    code, _, err = run_cli([*args[:7], "--format", "asap", *args[9:]], capsys)
    assert code != 0 and "--format 'asap': choose one of" in err and "Traceback" not in err


def test_a_slide_made_with_other_options_is_kept_unless_overwrite(tmp_path, crop_bank):
    map_path = grid_map(tmp_path / "map.png", 4, seed=6)
    first = generate_slide(options(tmp_path, map_path, crop_bank, steps=1))
    before = (tmp_path / "slide.tif").read_bytes()
    with pytest.raises(UserError, match="a slide made with other options is there; pass --overwrite"):
        generate_slide(options(tmp_path, map_path, crop_bank, steps=1, seed=1))
    assert (tmp_path / "slide.tif").read_bytes() == before
    again = generate_slide(options(tmp_path, map_path, crop_bank, steps=1))  # the same options: nothing to do
    assert again == first
    replaced = generate_slide(options(tmp_path, map_path, crop_bank, steps=1, seed=1, overwrite=True))
    assert replaced["options"]["seed"] == 1 and (tmp_path / "slide.tif").read_bytes() != before


def test_a_model_changed_in_place_makes_another_slide(tmp_path, crop_bank):
    """The same options with the model's files changed (here its glass bank) are not the slide already made."""
    import shutil

    from htd_toolkit.models.background import GlassBank

    model = tmp_path / "model"
    shutil.copytree(shipped_adapter_model(), model)
    map_path = grid_map(tmp_path / "map.png", 4, seed=6, glass=2)
    settings = dict(steps=1, keep_glass=True)
    generate_slide(options(tmp_path, map_path, crop_bank, model=str(model), **settings))
    before = (tmp_path / "slide.tif").read_bytes()
    GlassBank.flat((200, 210, 220)).save(model / "glass_bank.safetensors")
    with pytest.raises(UserError, match="a slide made with other options is there; pass --overwrite"):
        generate_slide(options(tmp_path, map_path, crop_bank, model=str(model), **settings))
    generate_slide(options(tmp_path, map_path, crop_bank, model=str(model), overwrite=True, **settings))
    assert (tmp_path / "slide.tif").read_bytes() != before


def test_the_denoised_cells_of_any_band_are_those_its_tissue_windows_cover():
    grid = fixture_grid(24, seed=8, glass=10)
    plan = slide_module.plan_windows(slide_module.SlideMap(grid, 16), 64, 16, 4)
    whole = np.zeros(plan.latent, bool)
    for top, lefts in plan.rows:
        for left in lefts:
            whole[top:top + plan.size, left:left + plan.size] = True
    assert 0 < whole.sum() < whole.size
    for first, last in [(0, plan.latent[0]), (0, 1), (5, 37), (12, 13), (40, plan.latent[0]), (30, 30)]:
        assert np.array_equal(plan.denoised(first, last), whole[first:last]), (first, last)


def test_the_blending_weights_are_a_ramp_over_the_overlap():
    """Mutation audit survivor: flat window weights passed the seam test above (its windows agree closely)."""
    expected = np.array([1, 2, 3, 4, 4, 4, 4, 3, 2, 1], np.float32) / 4  # 1 inside, falling over 3 cells each side
    np.testing.assert_allclose(slide_module.ramp(10, 3), expected)
    np.testing.assert_array_equal(slide_module.ramp(10, 0), np.ones(10, np.float32))  # no overlap: nothing to blend


def blended_windows(weights: np.ndarray, tile: int, overlap: int, side: int = 256) -> tuple[np.ndarray, list[int]]:
    """Windows of one smooth texture, each shifted by its own colour (as windows decoded on their own
    disagree), averaged by `weights` where they overlap as generate-slide averages them; and the window borders."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    texture = gaussian_filter(rng.normal(0, 60, (side, side, 3)), (2, 2, 0))
    total, weight = np.zeros((side, side, 3)), np.zeros((side, side, 1))
    starts = window_starts(side, tile, tile - overlap)
    for top in starts:
        for left in starts:
            cells = (slice(top, top + tile), slice(left, left + tile))
            total[cells] += weights[..., None] * (texture[cells] + rng.normal(0, 10, 3))
            weight[cells] += weights[..., None]
    return total / weight, sorted({b for s in starts for b in (s, s + tile)})


def test_ramp_weights_leave_no_seam_where_flat_weights_do():
    tile, overlap = 64, 32
    ratios = {}
    for name, weights in [("ramp", np.outer(*(slide_module.ramp(tile, overlap),) * 2)), ("flat", np.ones((tile, tile)))]:
        image, borders = blended_windows(weights, tile, overlap)
        ratios[name] = seam_ratio(image, borders, borders)
    assert ratios["ramp"] < 1.1 and ratios["flat"] > 2, ratios  # flat: each window's colour steps in at its edge
