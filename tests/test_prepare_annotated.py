"""`htd-toolkit prepare annotated` end to end on the real CC0 slide, run in-process."""

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import tiffslide
from PIL import Image

from htd_toolkit.cli import main
from htd_toolkit.data.crops import crop_side_range
from htd_toolkit.data.shards import read_tar
from htd_toolkit.patches import extract as extract_module
from htd_toolkit.wsi.pyramid import write_pyramidal_tiff
from tests.annotation_files import (
    camelyon_slides,
    closed,
    feature,
    write_camelyon16,
    write_geojson,
    write_panda_mask,
)
from tests.helpers import run_cli

FAST = ["--mpp", "2.0", "--patch-size", "128", "--stride", "64"]  # 513-px windows read from level 2


def prepare(capsys, slides, annotations, out, fmt="camelyon16", extra=()):
    args = ["prepare", "annotated", "--slides", *[str(s) for s in slides], "--annotations", str(annotations),
            "--format", fmt, "--out", str(out), *FAST, *extra]
    return run_cli(args, capsys)


def decode(members: dict, ext: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(members[ext])))


def samples_of(out, split="train"):
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["split"] == split:
            for key, members in read_tar(out / shard["path"]):
                yield key, dict(members)


@pytest.fixture(scope="module")
def camelyon_dir(cc0_pyramid, tmp_path_factory):
    """Three copies of the CC0 pyramid (tumor_001..003) with a tumour-with-hole XML each."""
    return camelyon_slides(cc0_pyramid, tmp_path_factory.mktemp("camelyon"), 3)


@pytest.fixture(scope="module")
def camelyon_out(camelyon_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["prepare", "annotated", "--slides", str(camelyon_dir / "slides"), "--annotations",
                 str(camelyon_dir / "ann"), "--format", "camelyon16", "--out", str(out), *FAST,
                 "--split", "0.34,0.33,0.33"]) == 0
    return out


def test_every_sample_meets_the_heterogeneity_rule(camelyon_out):
    manifest = json.loads((camelyon_out / "manifest.json").read_text())
    assert manifest["stats"]["kept"] > 20
    assert set(manifest["stats"]["rejected"]) <= {"low_tissue", "single_class", "dominant_class"}
    count = 0
    for split in ("train", "validation", "test"):
        for key, members in samples_of(camelyon_out, split):
            mask = decode(members, "mask.png")
            assert mask.dtype == np.uint8 and mask.ndim == 2 and mask.shape == (128, 128)
            counts = np.bincount(mask.ravel(), minlength=3)
            tissue = counts[1:] / counts[1:].sum()
            assert counts[1:].sum() / mask.size >= 0.5
            assert (tissue >= 0.2).sum() >= 2 and tissue.max() <= 0.8
            meta = json.loads(members["json"])
            assert meta["class_fractions"] == pytest.approx((counts / mask.size).tolist(), abs=1e-6)
            assert key == f"{meta['slide']}_{meta['x']}_{meta['y']}" and "." not in key
            assert list(members) == ["png", "mask.png", "json"]
            count += 1
    assert count == manifest["stats"]["kept"] == sum(manifest["splits"].values())


def test_image_is_the_slide_window_named_in_its_metadata(camelyon_out, cc0_pyramid):
    with tiffslide.TiffSlide(cc0_pyramid) as slide:
        for _, members in list(samples_of(camelyon_out))[:5]:
            meta = json.loads(members["json"])
            size0 = meta["level0_size"]  # level 2 is within 5 % of 2 µm/px: its pixels are used as they are
            assert size0 == 512 and meta["mpp"] == pytest.approx(0.499 * 4.002, abs=1e-3)
            image = decode(members, "png").astype(int)

            def diff(dx, dy, meta=meta, image=image, size0=size0):
                ref = slide.read_region((meta["x"] + dx, meta["y"] + dy), 0, (size0, size0))
                return np.abs(image - np.asarray(ref.resize((128, 128), Image.Resampling.BOX), int)).mean()

            # closest to the named window, farther from windows one output pixel (4 level-0 px) away
            here = diff(0, 0)
            assert here < 12 and all(here < diff(dx, dy) for dx, dy in [(4, 0), (-4, 0), (0, 4), (0, -4)])


def test_splits_are_by_slide_and_crops_come_from_train_only(camelyon_out):
    manifest = json.loads((camelyon_out / "manifest.json").read_text())
    slide_split = {s["slide_id"]: s["split"] for s in manifest["stats"]["slides"]}
    assert sorted(slide_split.values()) == ["test", "train", "validation"]
    for split in ("train", "validation", "test"):
        for _, members in samples_of(camelyon_out, split):
            assert slide_split[json.loads(members["json"])["slide"]] == split
    assert {c["class"] for c in manifest["crop_bank"]} == {1, 2}
    for record in manifest["crop_bank"]:
        for _, members in read_tar(camelyon_out / record["path"]):
            meta = json.loads(dict(members)["json"])
            assert slide_split[meta["slide"]] == "train" and meta["class"] == record["class"]
            crop = decode(dict(members), "png")
            low, high = crop_side_range(manifest["config"]["patch_size"])
            assert crop.shape[0] == crop.shape[1] == meta["side"] and low <= meta["side"] <= high


def test_crops_lie_inside_their_class_region(camelyon_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = prepare(capsys, [camelyon_dir / "slides" / "tumor_001.tif"], camelyon_dir / "ann", out,
                           extra=["--patch-size", "128", "--mpp", "1.0", "--stride", "128"])
    assert code == 0, err
    masks = {key: decode(m, "mask.png") for key, m in samples_of(out)}
    manifest = json.loads((out / "manifest.json").read_text())
    crops = 0
    for record in manifest["crop_bank"]:
        for key, members in read_tar(out / record["path"]):
            meta = json.loads(dict(members)["json"])
            sample_key = key.rsplit("_", 2)[0]
            x0, y0 = (int(v) for v in sample_key.split("_")[1:])
            scale = 1.0 / 0.499
            bx, by = round((meta["box"][0] - x0) / scale), round((meta["box"][1] - y0) / scale)
            d = meta["side"]
            assert crop_side_range(128) == (12, 50) and 12 <= d <= 50
            assert (masks[sample_key][by:by + d, bx:bx + d] == meta["class"]).all()
            crops += 1
    assert crops > 0


def test_same_options_same_bytes_and_no_file_names_written(camelyon_dir, camelyon_out, tmp_path, capsys):
    out = tmp_path / "again"
    code, _, err = prepare(capsys, [camelyon_dir / "slides"], camelyon_dir / "ann", out,
                           extra=["--split", "0.34,0.33,0.33", "--workers", "2"])
    assert code == 0, err
    first = json.loads((camelyon_out / "manifest.json").read_text())
    second = json.loads((out / "manifest.json").read_text())
    assert first["shards"] == second["shards"] and first["crop_bank"] == second["crop_bank"]
    for record in second["shards"]:
        assert hashlib.sha256((out / record["path"]).read_bytes()).hexdigest() == record["sha256"]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"tumor_00" not in data and str(camelyon_dir).encode() not in data, path


def test_resume_after_an_interruption(camelyon_dir, camelyon_out, tmp_path, capsys, monkeypatch):
    out = tmp_path / "resumed"
    calls = []
    real = extract_module.extract_slide

    def interrupted(job, *args):
        calls.append(job.slide_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job, *args)

    monkeypatch.setattr("htd_toolkit.patches.annotated.extract_slide", interrupted)
    code, _, _ = prepare(capsys, [camelyon_dir / "slides"], camelyon_dir / "ann", out,
                         extra=["--split", "0.34,0.33,0.33"])
    assert code != 0  # click turns the interrupt into "Aborted!"
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tar")) or all(".work" in str(p) for p in out.rglob("*.tar"))
    calls.clear()
    monkeypatch.setattr("htd_toolkit.patches.annotated.extract_slide", lambda job, *a: calls.append(job) or real(job, *a))
    code, _, err = prepare(capsys, [camelyon_dir / "slides"], camelyon_dir / "ann", out,
                           extra=["--split", "0.34,0.33,0.33"])
    assert code == 0, err
    assert len(calls) == 2  # the finished slide was not redone
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((camelyon_out / "manifest.json").read_text())["shards"]


def test_slide_shards_merge_into_the_same_dataset(camelyon_dir, camelyon_out, tmp_path, capsys):
    out = tmp_path / "sharded"
    base = [camelyon_dir / "slides"], camelyon_dir / "ann", out
    for shard in ("0/2", "1/2"):
        code, _, err = prepare(capsys, *base, extra=["--split", "0.34,0.33,0.33", "--slide-shard", shard])
        assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((camelyon_out / "manifest.json").read_text())["shards"]
    processes = {json.loads(p.read_text())["slide_id"]: json.loads(p.read_text())["process"]
                 for p in (out / ".work").glob("*/*.json")}
    assert sorted(processes.values()) == [0, 0, 1]  # three slides: two processes shared them


@pytest.fixture(scope="module")
def marker_slide(sample_slide, tmp_path_factory):
    """The CC0 slide with a pure green wide rectangle painted in, annotated exactly (GeoJSON)."""
    root = tmp_path_factory.mktemp("marker")
    with tiffslide.TiffSlide(sample_slide) as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions, as_array=True).copy()
    pixels[1300:1420, 1100:1500] = (0, 255, 0)  # y 1300..1420, x 1100..1500: wide, off the diagonal
    (root / "slides").mkdir()
    (root / "ann").mkdir()
    write_pyramidal_tiff(root / "slides" / "marked.tif", pixels, 0.499)
    rect = [(1100, 1300), (1500, 1300), (1500, 1420), (1100, 1420)]
    around = [(900, 1100), (1700, 1100), (1700, 1620), (900, 1620)]
    write_geojson(root / "ann", "marked", [feature("tissue", [closed(around)]), feature("marker", [closed(rect)])])
    return root


@pytest.mark.parametrize("mpp, size", [(1.0, 128), (2.0, 64), (0.499, 256)])
def test_image_and_mask_are_aligned(marker_slide, tmp_path, capsys, mpp, size):
    out = tmp_path / "out"
    code, _, err = run_cli(["prepare", "annotated", "--slides", str(marker_slide / "slides"), "--annotations",
                            str(marker_slide / "ann"), "--format", "geojson", "--out", str(out), "--mpp", str(mpp),
                            "--patch-size", str(size), "--stride", str(size // 4), "--min-tissue", "0.3"], capsys)
    assert code == 0, err
    assert json.loads((out / "id2label.json").read_text()) == {"0": "background", "1": "tissue", "2": "marker"}
    checked = 0
    for _, members in samples_of(out):
        image, mask = decode(members, "png").astype(int), decode(members, "mask.png")
        green = (image[..., 1] > 200) & (image[..., 0] < 60) & (image[..., 2] < 60)
        marked = mask == 2
        if marked.sum() > 0.05 * mask.size:
            iou = (green & marked).sum() / (green | marked).sum()
            assert iou > 0.9, iou
            checked += 1
    assert checked >= 2


def test_panda_masks(cc0_pyramid, tmp_path, capsys):
    (tmp_path / "slides").mkdir()
    (tmp_path / "masks").mkdir()
    shutil.copy(cc0_pyramid, tmp_path / "slides" / "abc123.tiff")
    labels = np.zeros((2967, 2220), np.uint8)
    labels[800:2000, 900:1300] = 1
    labels[800:2000, 1300:1700] = 4
    write_panda_mask(tmp_path / "masks" / "abc123_mask.tiff", labels)
    code, _, err = prepare(capsys, [tmp_path / "slides"], tmp_path / "masks", tmp_path / "out", fmt="panda-radboud")
    assert code == 0, err
    ids = json.loads((tmp_path / "out" / "id2label.json").read_text())
    assert ids["1"] == "stroma" and ids["4"] == "gleason 4" and len(ids) == 6
    seen = set()
    for _, members in samples_of(tmp_path / "out"):
        seen |= set(np.unique(decode(members, "mask.png")).tolist())
    assert seen == {0, 1, 4}


# --- bad input: one clear line naming the file, no traceback, non-zero exit ----------------------------

def _write_blank(path, mpp=0.499, **kwargs):
    write_pyramidal_tiff(path, np.full((600, 600, 3), 245, np.uint8), mpp, **kwargs)


def bad_inputs(root, cc0_pyramid):
    """(slide file, annotation writer, expected message) for each kind of bad input."""
    cases = {}
    (root / "garbage.tif").write_bytes(b"this is not a tiff at all" * 100)
    cases["garbage.tif"] = "cannot read the slide"
    (root / "truncated.tif").write_bytes(cc0_pyramid.read_bytes()[:20000])
    cases["truncated.tif"] = "cannot read"
    _write_blank(root / "blank.tif")
    cases["blank.tif"] = "no tissue detected"
    _write_blank(root / "nompp.tif", mpp=None)
    cases["nompp.tif"] = "neither mpp nor objective-power"
    return cases


def test_each_bad_slide_is_one_line_and_keep_going_finishes_the_others(cc0_pyramid, tmp_path, capsys):
    slides, ann = tmp_path / "slides", tmp_path / "ann"
    slides.mkdir()
    ann.mkdir()
    cases = bad_inputs(slides, cc0_pyramid)
    shutil.copy(cc0_pyramid, slides / "good.tif")
    for name in [*cases, "good.tif"]:
        write_camelyon16(ann, name.removesuffix(".tif"))
    code, _, err = prepare(capsys, [slides], ann, tmp_path / "out", extra=["--keep-going"])
    assert code == 1
    assert "Traceback" not in err
    for name, message in cases.items():
        lines = [line for line in err.splitlines() if line.startswith("failed:") and name in line]
        assert len(lines) == 1 and message in lines[0], (name, err)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["stats"]["slides"]) == 1 and manifest["stats"]["kept"] > 0


@pytest.mark.parametrize("case", ["malformed_xml", "unknown_class", "orphan_annotation", "missing_slide_dir"])
def test_bad_annotations_stop_with_one_line(case, cc0_pyramid, tmp_path, capsys):
    slides, ann = tmp_path / "slides", tmp_path / "ann"
    slides.mkdir()
    ann.mkdir()
    shutil.copy(cc0_pyramid, slides / "s1.tif")
    write_camelyon16(ann, "s1")
    expected = {"malformed_xml": "s1.xml: malformed ASAP XML", "unknown_class": "s1.xml: unknown class name 'Foo'",
                "orphan_annotation": "ghost.xml: annotation without slide",
                "missing_slide_dir": "nowhere: no such slide file or folder"}[case]
    if case == "malformed_xml":
        (ann / "s1.xml").write_text("<ASAP_Annotations><Annot")
    elif case == "unknown_class":
        write_camelyon16(ann, "s1", [("Foo", [(0, 0), (10, 0), (10, 10)])])
    elif case == "orphan_annotation":
        write_camelyon16(ann, "ghost")
    slide_arg = [tmp_path / "nowhere"] if case == "missing_slide_dir" else [slides]
    code, _, err = prepare(capsys, slide_arg, ann, tmp_path / "out")
    assert code == 1
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_objective_power_is_used_when_mpp_is_missing(cc0_pyramid, tmp_path, capsys, caplog):
    slides, ann = tmp_path / "slides", tmp_path / "ann"
    slides.mkdir()
    ann.mkdir()
    with tiffslide.TiffSlide(cc0_pyramid) as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
    header = "Aperio Image Library v12.0.0\n2220x2967 -> 2220x2967 - |AppMag = 20|Filename = test"
    write_pyramidal_tiff(slides / "power.svs", pixels, None, description=header)  # single level, no mpp
    write_camelyon16(ann, "power")
    code, _, err = prepare(capsys, [slides], ann, tmp_path / "out")
    assert code == 0, err
    assert "no mpp metadata; using objective power 20x" in caplog.text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stats"]["slides"][0]["mpp_source"] == "objective-power" and manifest["stats"]["kept"] > 0


def test_panda_slide_without_its_mask_names_the_slide(cc0_pyramid, tmp_path, capsys):
    (tmp_path / "slides").mkdir()
    (tmp_path / "masks").mkdir()
    shutil.copy(cc0_pyramid, tmp_path / "slides" / "lonely.tiff")
    code, _, err = prepare(capsys, [tmp_path / "slides"], tmp_path / "masks", tmp_path / "out", fmt="panda-radboud")
    assert code == 1 and "lonely.tiff: no annotation file found in masks/" in err and "Traceback" not in err


def test_panda_mask_of_another_size_names_the_file(cc0_pyramid, tmp_path, capsys):
    (tmp_path / "slides").mkdir()
    (tmp_path / "masks").mkdir()
    shutil.copy(cc0_pyramid, tmp_path / "slides" / "p1.tiff")
    write_panda_mask(tmp_path / "masks" / "p1_mask.tiff", np.zeros((100, 100), np.uint8))
    code, _, err = prepare(capsys, [tmp_path / "slides"], tmp_path / "masks", tmp_path / "out", fmt="panda-radboud")
    assert code == 1
    assert "p1_mask.tiff: mask is 100x100 but its slide is 2220x2967" in err


def test_accelerate_launch_splits_slides_between_two_processes(camelyon_dir, camelyon_out, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "launched"
    launcher = Path(sys.executable).with_name("accelerate")
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_two_process.yaml"
    cmd = [str(launcher), "launch", "--config_file", str(config), "-m", "htd_toolkit.cli", "prepare", "annotated", "--slides",
           str(camelyon_dir / "slides"), "--annotations", str(camelyon_dir / "ann"), "--format", "camelyon16",
           "--out", str(out), *FAST, "--split", "0.34,0.33,0.33"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert result.stderr.count("slides done") == 1  # one summary, from the main process
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((camelyon_out / "manifest.json").read_text())["shards"]
    processes = {json.loads(p.read_text())["slide_id"]: json.loads(p.read_text())["process"]
                 for p in (out / ".work").glob("*/*.json")}
    assert sorted(processes.values()) == [0, 0, 1]  # three slides: two processes shared them


def test_random_windows_and_per_slide_cap(camelyon_dir, tmp_path, capsys):
    out = tmp_path / "random"
    code, _, err = prepare(capsys, [camelyon_dir / "slides" / "tumor_001.tif"], camelyon_dir / "ann", out,
                           extra=["--sampling", "random", "--windows-per-slide", "300", "--max-patches-per-slide", "5",
                                  "--seed", "3"])
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    slide = manifest["stats"]["slides"][0]
    assert slide["tried"] == 300 and slide["kept"] == 5 and slide["rejected"].get("over_cap", 0) > 0
    keys = [key for key, _ in samples_of(out)]
    assert len(keys) == 5 and len(set(keys)) == 5


def test_fast_tissue_test_equals_median_filtered_rgb2hsv(sample_slide):
    """saturation() is skimage's S channel and median_above() is median_filter(...) > t, bit for bit."""
    import tiffslide
    from scipy import ndimage
    from skimage import color

    from htd_toolkit.wsi import tissue

    rng = np.random.default_rng(0)
    with tiffslide.TiffSlide(sample_slide) as slide:
        images = [slide.read_region((int(rng.integers(0, 1900)), int(rng.integers(0, 2600))), 0, (128, 128),
                                    as_array=True) for _ in range(4)]
    images += [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), np.zeros((9, 9, 3), np.uint8)]
    for image in images:
        reference = color.rgb2hsv(image)[..., 1] * 255.0
        assert np.array_equal(tissue.saturation(image), reference)
        for size in (4, 5, 7):
            for threshold in (0.0, 8.0, 20.5, float(np.median(reference))):
                assert np.array_equal(tissue.median_above(reference, threshold, size),
                                      ndimage.median_filter(reference, size=size) > threshold)


def test_the_crop_bank_holds_no_duplicate_crops(camelyon_dir, tmp_path, capsys):
    """Many crops per class from small regions cut some crops twice; the bank keeps one of each, so the
    crop-space memorization audit has a threshold above 0."""
    import hashlib

    out = tmp_path / "out"
    code, _, err = prepare(capsys, [camelyon_dir / "slides" / "tumor_001.tif"], camelyon_dir / "ann", out,
                           extra=["--patch-size", "64", "--mpp", "2.0", "--stride", "32", "--crops-per-class", "20"])
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    pixels = [hashlib.sha256(decode(dict(members), "png").tobytes()).hexdigest()
              for record in manifest["crop_bank"] for _, members in read_tar(out / record["path"])]
    assert len(pixels) == len(set(pixels)) > 0
    assert manifest["stats"]["duplicate_crops"] > 0


def test_crop_sizes_scale_with_the_patch_and_can_be_set(camelyon_dir, tmp_path, capsys):
    """The paper's 50-200 px at 512 px, scaled: 64-px patches get 8-25 px crops of every class;
    --crop-size sets them; a class no crop fits gets a warning."""
    assert crop_side_range(512) == (50, 200) and crop_side_range(64) == (8, 25)
    assert crop_side_range(64, (10, 12)) == (10, 12)
    slide = [camelyon_dir / "slides" / "tumor_001.tif"]
    common = ["--patch-size", "64", "--mpp", "2.0", "--stride", "32"]
    for name, extra, sides in [("default", [], (8, 25)), ("set", ["--crop-size", "10,12"], (10, 12))]:
        code, _, err = prepare(capsys, slide, camelyon_dir / "ann", tmp_path / name, extra=common + extra)
        assert code == 0, err
        assert "warning" not in err
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert {record["class"] for record in manifest["crop_bank"]} == {1, 2}
        for record in manifest["crop_bank"]:
            for _, members in read_tar(tmp_path / name / record["path"]):
                assert sides[0] <= json.loads(dict(members)["json"])["side"] <= sides[1]
    code, _, err = prepare(capsys, slide, camelyon_dir / "ann", tmp_path / "huge", extra=[*common, "--crop-size", "60,64"])
    assert code == 0 and "warning: no crop-bank crop of class 'tumor'" in err
    code, _, err = prepare(capsys, slide, camelyon_dir / "ann", tmp_path / "bad", extra=[*common, "--crop-size", "30,20"])
    assert code == 1 and "--crop-size MAX" in err and len(err.strip().splitlines()) == 1


def test_class_map_from_the_command_line(camelyon_dir, camelyon_out, tmp_path, capsys):
    """Renamed groups (`metastasis`/`negative`) give the same patches as Tumor/_2 once mapped."""
    from tests.annotation_files import HOLE, TUMOUR

    ann = tmp_path / "renamed"
    ann.mkdir()
    write_camelyon16(ann, "tumor_001", [("metastasis", TUMOUR), ("negative", HOLE)])
    slide = [camelyon_dir / "slides" / "tumor_001.tif"]
    code, _, err = prepare(capsys, slide, ann, tmp_path / "refused")
    assert code == 1 and "tumor_001.xml: unknown class name 'metastasis'" in err
    code, _, err = prepare(capsys, slide, ann, tmp_path / "mapped",
                           extra=["--class-map", "metastasis=tumor,negative=exclude"])
    assert code == 0, err
    reference = tmp_path / "reference"
    code, _, err = prepare(capsys, slide, camelyon_dir / "ann", reference)
    assert code == 0, err
    assert [m["mask.png"] for _, m in samples_of(tmp_path / "mapped")] == \
        [m["mask.png"] for _, m in samples_of(reference)]
    code, _, err = prepare(capsys, slide, ann, tmp_path / "typo", extra=["--class-map", "metastasis=tumour"])
    assert code == 1 and "'tumour' is not a camelyon16 class" in err


def splits_for_seed(slides, annotations, out, seed: int) -> dict[str, str]:
    """Slide file name → split, as `prepare annotated --seed SEED --split 0.5,0.25,0.25` assigns them."""
    from htd_toolkit.patches.annotated import PrepareOptions, build_jobs
    from htd_toolkit.patches.extract import ExtractConfig

    options = PrepareOptions(slides=[slides], annotations=annotations, out=out, split=(0.5, 0.25, 0.25),
                             extract=ExtractConfig(format="camelyon16", seed=seed))
    jobs, _ = build_jobs(options)
    return {job.path.name: job.split for job in jobs}


def test_the_split_of_the_slides_follows_the_seed(tmp_path):
    """Mutation audit survivor: a slide order that ignores --seed passed every end-to-end test."""
    slides, annotations = tmp_path / "slides", tmp_path / "ann"
    slides.mkdir()
    annotations.mkdir()
    for index in range(24):
        (slides / f"tumor_{index:03d}.tif").touch()
    first = splits_for_seed(slides, annotations, tmp_path / "out", 0)
    assert splits_for_seed(slides, annotations, tmp_path / "out", 0) == first
    assert sorted(first.values()).count("train") == 12
    for seed in (1, 2):
        other = splits_for_seed(slides, annotations, tmp_path / "out", seed)
        assert other != first and sorted(other.values()) == sorted(first.values())
