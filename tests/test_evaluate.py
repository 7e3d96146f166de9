"""Evaluation: Fréchet distance, precision/recall, DeepLabv3+ synthetic vs real, memorization, cards."""

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial

from htd_toolkit.errors import UserError
from htd_toolkit.evaluate import memorization as mem
from htd_toolkit.evaluate.fd import frechet_distance
from htd_toolkit.evaluate.precision_recall import precision_recall
from htd_toolkit.evaluate.sets import load_set
from tests.helpers import run_cli

MODULES = Path(__file__).resolve().parents[1] / "htd_toolkit" / "evaluate" / "hub_metrics"


def reference_fd(a, b):
    """The textbook formula with scipy's sqrtm, float64."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 32))
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-8)
    values = [frechet_distance(real, real + rng.normal(size=real.shape) * s) for s in (0.05, 0.2, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("dim", [8, 64])
def test_fd_agrees_with_a_float64_reference(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim)) + 0.5
    assert frechet_distance(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(reference_fd(a, b), rel=1e-4)


def test_fd_is_finite_on_singular_covariances():
    rng = np.random.default_rng(1)
    low_rank = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 40))  # 40-d features of rank 3
    assert np.isfinite(frechet_distance(low_rank, low_rank + 1.0))


def test_precision_recall_on_identical_and_separable_sets():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 16))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100) == (0.0, 0.0)
    p, r = precision_recall(a, rng.normal(size=(200, 16)) * 0.3)  # a narrow synthetic set: precise, low recall
    assert p > 0.9 and r < 0.6


def test_precision_recall_equal_the_reference_implementation():
    from prdc.prdc import compute_nearest_neighbour_distances, compute_pairwise_distance

    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(300, 24)), rng.normal(size=(250, 24)) * 0.8 + 0.2
    across = compute_pairwise_distance(real, fake)  # prdc (NAVER): full matrices, strict <; no ties here
    reference = ((across < compute_nearest_neighbour_distances(real, 3)[:, None]).any(axis=0).mean(),
                 (across < compute_nearest_neighbour_distances(fake, 3)[None, :]).any(axis=1).mean())
    assert precision_recall(real, fake, 3) == pytest.approx(reference, abs=0)


def test_blocked_neighbour_queries_equal_the_full_distance_matrix():
    from htd_toolkit.evaluate import neighbours

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(37, 6))
    a[7] = a[3]  # a duplicate: its nearest other point is at distance 0
    full = scipy.spatial.distance.cdist(a, b)
    distance, index = neighbours.nearest(a, b, block=8)
    assert np.allclose(distance, full.min(axis=1), atol=1e-12) and np.array_equal(index, full.argmin(axis=1))
    own = scipy.spatial.distance.cdist(a, a)
    np.fill_diagonal(own, np.inf)
    distance, index = neighbours.nearest(a, a, exclude_self=True, block=8)
    assert np.allclose(distance, own.min(axis=1), atol=1e-12) and distance[3] == distance[7] == 0
    np.fill_diagonal(own, 0)
    assert np.allclose(neighbours.kth_neighbour_distance(a, 3, block=8), np.sort(own, axis=1)[:, 3], atol=1e-12)
    radii_a, radii_b = rng.uniform(0.5, 2.0, size=len(a)), rng.uniform(0.5, 2.0, size=len(b))
    assert neighbours.mutual_ball_coverage(a, b, radii_a, radii_b, block=8) == pytest.approx(
        ((full < radii_a[:, None]).any(axis=0).mean(), (full < radii_b[None, :]).any(axis=1).mean()))


@pytest.fixture(scope="module")
def overlapping_windows(sample_slide):
    """625 real 64-px windows of the CC0 slide, 4 px apart: every one has near-duplicates."""
    import tiffslide

    with tiffslide.TiffSlide(sample_slide) as slide:
        region = slide.read_region((1000, 800), 0, (160, 160), as_array=True)
    return np.stack([region[y:y + 64, x:x + 64] for y in range(0, 97, 4) for x in range(0, 97, 4)])


def brute_force_nearest(query, reference, exclude_self=False):
    full = scipy.spatial.distance.cdist(np.float64(query), np.float64(reference))
    if exclude_self:
        np.fill_diagonal(full, np.inf)
    return full.min(axis=1)


def offset_stain_stats(images):
    """Stain statistics plus a shared offset: like a foundation model's features, whose large common
    component makes float32 distances between near-duplicates mostly round-off."""
    from htd_toolkit.clustering.encoders import stain_stats

    return stain_stats(images) + 10.0


def test_every_exact_copy_is_found_at_zero_among_near_duplicates(overlapping_windows):
    """600 verbatim copies of overlapping real windows: all at distance 0 and flagged, in every space; the
    threshold is the float64 brute force's. (A float32 argmin misses 466 of the 600.)"""
    real = overlapping_windows
    synthetic = real[np.random.default_rng(0).permutation(len(real))[:600]]
    encoder = offset_stain_stats
    result = mem.audit(real, synthetic, encoder)
    space = result["spaces"]["encoder"]
    assert (space["distance"] == 0).all() and result["flagged"].all()
    assert np.array_equal(real[space["index"]], synthetic)
    assert (result["spaces"]["pixel"]["distance"] == 0).all()
    features = encoder(real)
    reference = np.quantile(brute_force_nearest(features, features, exclude_self=True), 0.01)
    assert space["threshold"] == pytest.approx(reference, rel=1e-12, abs=0)


def test_duplicate_crops_do_not_switch_the_crop_audit_off(overlapping_windows):
    from htd_toolkit.clustering.encoders import get_encoder

    quarters = overlapping_windows[:, :32, :32]
    crops = np.concatenate([quarters[::3], quarters[::9]])  # every third crop twice: duplicates in the bank
    synthetic = overlapping_windows[1::3].copy()  # neighbours of the crops' windows, no copies
    synthetic[4, :32, :32] = crops[10]  # one image carries a crop verbatim
    space = mem.audit(overlapping_windows[::2], synthetic, get_encoder("stain-stats"), crops)["spaces"]["crops"]
    assert space["threshold"] > 0
    assert space["flagged"][4] and space["distance"][4] == 0



@pytest.fixture(scope="module")
def tissue_windows(sample_slide):
    """600 real 64-px windows of the CC0 slide, side by side (no overlap), each with tissue."""
    import tiffslide

    with tiffslide.TiffSlide(sample_slide) as slide:
        region = slide.read_region((0, 0), 0, slide.dimensions, as_array=True)
    windows = np.stack([region[y:y + 64, x:x + 64] for y in range(0, region.shape[0] - 63, 64)
                        for x in range(0, region.shape[1] - 63, 64)])
    tissue = windows[windows.mean(axis=(1, 2, 3)) < 215]
    return tissue[np.random.default_rng(0).permutation(len(tissue))[:600]]


@pytest.mark.parametrize("space", ["pixel", "stain-stats"])
def test_near_duplicates_in_the_real_set_leave_the_copy_threshold_alone(tissue_windows, space):
    """The check that found it: 300 near-duplicate pairs (noise 2e-4) added to the real set made the copy
    threshold their own distance, so near-copies of real patches went unflagged (0 of 300 here, 11 of 300
    in the check) while the exact copies were all found."""
    from htd_toolkit.clustering.encoders import stain_stats

    features = (mem.pixel_features if space == "pixel" else stain_stats)(tissue_windows).astype(np.float64)
    clean = mem.copy_threshold(features)
    rng = np.random.default_rng(1)
    pairs, others = np.split(rng.permutation(len(features)), [300])
    dimensions = features.shape[1]
    real = np.concatenate([features, features[pairs] + rng.normal(0, 2e-4, (len(pairs), dimensions))])
    near_copies = features[others] + rng.normal(0, 0.5 * clean / np.sqrt(dimensions), (len(others), dimensions))
    result = mem.space_audit(real, np.concatenate([features[others], near_copies]))
    assert result["threshold"] == pytest.approx(clean, rel=0.01)
    assert result["flagged"][:len(others)].all() and result["flagged"][len(others):].sum() == len(others)

def test_precision_recall_equal_prdc_on_real_patch_features(overlapping_windows):
    """prdc run on the same float32 features (sklearn computes their distances in float64); then points
    placed just inside the real balls, against a float64 brute force (a float32 comparison, and prdc's
    float64 matrix-product form, put some of them outside)."""
    from prdc import compute_prdc

    from htd_toolkit.clustering.encoders import stain_stats
    from htd_toolkit.evaluate.neighbours import kth_neighbour_distance

    features = stain_stats(overlapping_windows).astype(np.float32)
    real, fake = features[::2], features[1::2]
    reference = compute_prdc(real, fake, 3)
    assert precision_recall(real, fake, 3) == (reference["precision"], reference["recall"])

    real = offset_stain_stats(overlapping_windows[::2]).astype(np.float64)
    radii = np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, 3]
    assert np.allclose(kth_neighbour_distance(real, 3), radii, rtol=1e-12, atol=0)
    direction = np.random.default_rng(1).normal(size=real.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    edge = real + direction * radii[:, None] * (1 - 1e-6)
    inside = scipy.spatial.distance.cdist(real, edge) < radii[:, None]
    assert inside.any(axis=0).all()
    fake_radii = np.sort(scipy.spatial.distance.cdist(edge, edge), axis=1)[:, 3]
    recall = (scipy.spatial.distance.cdist(real, edge) < fake_radii[None, :]).any(axis=1).mean()
    assert precision_recall(real, edge, 3) == (1.0, recall)


def test_large_sets_are_memory_mapped_and_equal(prepared, tmp_path, monkeypatch):
    from htd_toolkit.evaluate import sets

    in_memory = load_set(prepared, "train")
    monkeypatch.setenv("HTD_CACHE", str(tmp_path))
    monkeypatch.setattr(sets, "MEMMAP_BYTES", 0)  # every array counts as large
    mapped = load_set(prepared, "train", limit=5)
    assert isinstance(mapped.images, np.memmap) and isinstance(mapped.masks, np.memmap)
    assert np.array_equal(mapped.images, in_memory.images[:5]) and np.array_equal(mapped.masks, in_memory.masks[:5])
    assert mapped.keys == in_memory.keys[:5]
    small = sets.resized(mapped, 32)
    assert isinstance(small.images, np.memmap) and small.images.shape == (5, 32, 32, 3)
    assert not any((tmp_path / "evaluate-tmp").iterdir())  # temporary files are unlinked at once


def test_metrics_load_as_evaluate_modules():
    import evaluate

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 1
    fd = evaluate.load(str(MODULES / "frechet_distance"))
    assert fd.compute(predictions=b.tolist(), references=a.tolist())["frechet_distance"] == \
        pytest.approx(frechet_distance(a, b))
    pr = evaluate.load(str(MODULES / "precision_recall"))
    assert pr.compute(predictions=b.tolist(), references=a.tolist(), k=3) == dict(
        zip(("precision", "recall"), precision_recall(a, b, 3), strict=True))


def test_segmentation_learns_above_the_majority_baseline(prepared):
    from htd_toolkit.evaluate.segmentation import majority_baseline, score, train_segmenter

    train, test = load_set(prepared, "train"), load_set(prepared, "validation")
    epochs = []
    model = train_segmenter(train.images, train.masks, 3, epochs=25, size=64, batch_size=4, encoder="resnet18",
                            on_epoch=lambda: epochs.append(1))
    assert len(epochs) == 25  # what drives the progress bar
    learned = score(model, test.images, test.masks, train.classes, size=64)
    baseline = majority_baseline(train.masks, test.masks, train.classes)
    # background (unstained glass) vs tissue is learnable from colour; the trivial baseline gets one class only
    assert learned["miou"] > baseline["miou"] + 0.05, (learned, baseline)


def test_audit_flags_a_planted_copy(prepared):
    from htd_toolkit.clustering.encoders import get_encoder

    real = load_set(prepared, "train")
    other = load_set(prepared, "validation")
    rng = np.random.default_rng(0)
    synthetic = np.clip(other.images.astype(int) + rng.integers(-40, 40, other.images.shape), 0, 255).astype(np.uint8)
    synthetic[3] = real.images[5]  # a verbatim copy of a training image
    result = mem.audit(real.images, synthetic, get_encoder("stain-stats"))
    assert result["flagged"][3] and result["spaces"]["encoder"]["index"][3] == 5
    assert result["spaces"]["pixel"]["flagged"][3]
    summary = mem.summary(result, "stain-stats", [f"s{i}" for i in range(len(synthetic))])
    assert "s3" in summary["flagged_keys"] and summary["flagged"] == len(summary["flagged_keys"])


@pytest.fixture(scope="module")
def evaluated(prepared, tmp_path_factory):
    """A bundle (from the generation tests' tiny model) evaluated end to end with every part on."""
    import shutil

    from htd_toolkit.cli import main
    from tests.test_generate import gen_args
    from tests.test_training import demo_args, train

    root = tmp_path_factory.mktemp("evaluate")
    base = root / "base"
    from htd_toolkit.testing.tiny_base import write_tiny_base

    write_tiny_base(base, layout="sd15")
    assert train(demo_args(base, prepared, root / "model", "--max_train_steps", "2", "--checkpointing_steps", "0",
                           "--validation_steps", "0")) == 0
    assert main(gen_args(root / "model", prepared, root / "bundle", 8)) == 0
    shutil.copytree(prepared, root / "real")
    out = root / "results" / "metrics.json"
    code = main(["evaluate", "--real", str(root / "real"), "--synthetic", str(root / "bundle"), "--out", str(out),
                 "--encoders", "stain-stats,timm:vit_tiny_patch16_224", "--segmentation", "deeplabv3plus",
                 "--epochs", "2", "--seg-size", "64", "--seg-encoder", "resnet18", "--memorization", "--update-card",
                 "--model", str(root / "model"), "--size", "64", "--test-split", "validation"])
    assert code == 0
    return root, json.loads(out.read_text())


def test_metrics_json_follows_the_design(evaluated):
    _, metrics = evaluated
    assert set(metrics) == {"fd", "precision", "recall", "segmentation", "memorization", "settings"}
    assert set(metrics["fd"]) == {"stain-stats", "timm:vit_tiny_patch16_224"}
    assert all(v >= 0 for v in metrics["fd"].values())
    assert all(0 <= metrics[m][e] <= 1 for m in ("precision", "recall") for e in metrics["fd"])
    seg = metrics["segmentation"]
    assert set(seg) >= {"synthetic", "real", "real+synthetic"} and 0 <= seg["synthetic"]["miou"] <= 1
    memo = metrics["memorization"]
    assert {"encoder", "nn_distance_quantiles", "flagged", "threshold"} <= set(memo)
    assert "TP/(TP+FP+FN)" in metrics["settings"]["segmentation"]["iou"]


def test_update_card_writes_results_into_both_cards(evaluated):
    from huggingface_hub import DatasetCard, ModelCard

    root, metrics = evaluated
    card = DatasetCard.load(root / "bundle" / "README.md")
    assert "## Evaluation" in card.text and "stain-stats" in card.text and "## Memorization audit" in card.text
    assert (root / "bundle" / "assets" / "memorization.png").exists()
    model_card = ModelCard.load(root / "model" / "README.md")
    results = model_card.data.eval_results
    assert {r.metric_type for r in results} == {"frechet_distance", "mean_iou"}
    fd = next(r for r in results if r.metric_name == "FD (stain-stats)")
    assert fd.metric_value == pytest.approx(metrics["fd"]["stain-stats"])


@pytest.mark.parametrize("case, message", [
    ("sizes", "image sizes differ"),
    ("mixed sizes", "images of different sizes (64, 64, 3) and (32, 32, 3)"),
    ("classes", "its classes"),
    ("weights", "inception_v3_google-0cc3c7bd.pth"),
    ("unknown encoder", "known encoders are"),
    ("out is a folder", "is a folder; --out names the metrics JSON file"),
    ("out is not ours", "exists and was not written by evaluate"),
    ("huge size", "--size 100000: expected a finite number at least 8 and at most 4096"),  # was an OOM kill
    ("huge seg-size", "--seg-size 100000: expected a finite number at least 8 and at most 4096"),  # a traceback
])
def test_bad_input_is_one_line(evaluated, prepared, tmp_path, capsys, case, message):
    import shutil

    root, _ = evaluated
    real, synthetic, extra = root / "real", root / "bundle", ["--size", "64"]
    out = tmp_path / "m.json"
    if case == "out is a folder":
        out.mkdir()
    elif case == "out is not ours":
        out.write_text('{"my": "results"}')
    if case == "sizes":
        extra = []
    elif case == "mixed sizes":  # one set whose images are not all the same size
        from tests.helpers import write_wds_shard

        synthetic = tmp_path / "bundle"
        shutil.copytree(root / "bundle", synthetic)
        write_wds_shard(synthetic / "data" / "train-00000.tar", [
            (f"s{side}", np.zeros((side, side, 3), np.uint8), np.zeros((side, side), np.uint8), {})
            for side in (64, 32)])
        manifest = json.loads((synthetic / "manifest.json").read_text())
        data = (synthetic / "data" / "train-00000.tar").read_bytes()
        manifest["shards"] = [{**manifest["shards"][0], "samples": 2, "sha256": hashlib.sha256(data).hexdigest()}]
        (synthetic / "manifest.json").write_text(json.dumps(manifest))
    elif case == "classes":
        synthetic = tmp_path / "bundle"
        shutil.copytree(root / "bundle", synthetic)
        manifest = json.loads((synthetic / "manifest.json").read_text())
        manifest["classes"][1]["name"] = "stroma"
        manifest.pop("class_fingerprint", None)  # a bundle from before fingerprints: its class names are compared
        (synthetic / "manifest.json").write_text(json.dumps(manifest))
    elif case == "weights":
        extra += ["--encoders", "inception"]
    elif case.startswith("huge"):
        extra = [f"--{case.split()[1]}", "100000", "--segmentation", "deeplabv3plus"]
    else:
        extra += ["--encoders", "dinov9"]
    code, _, err = run_cli(["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--out",
                            str(out), *extra], capsys)
    assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    if case == "out is not ours":
        assert out.read_text() == '{"my": "results"}'
    if case == "out is a folder":
        assert not any(out.iterdir())


def test_sets_can_be_hub_dataset_ids(evaluated, tmp_path, capsys, monkeypatch):
    from htd_toolkit.publish.dataset import push_bundle
    from htd_toolkit.testing.hubserver import USER_TOKEN

    root, metrics = evaluated
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    push_bundle(root / "bundle", "user/eval-synthetic")
    out = tmp_path / "hub.json"
    code, _, err = run_cli(["evaluate", "--real", str(root / "real"), "--synthetic", "user/eval-synthetic",
                            "--out", str(out), "--size", "64"], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["fd"]["stain-stats"] == pytest.approx(metrics["fd"]["stain-stats"], rel=1e-6)


def test_published_settings_hold_no_local_path(evaluated):
    from htd_toolkit.clustering.encoders import public_spec

    root, metrics = evaluated
    assert metrics["settings"]["real"] == "real" and metrics["settings"]["synthetic"] == "bundle"
    assert str(root) not in json.dumps(metrics)
    assert public_spec("uni:/home/me/models/uni/pytorch_model.bin") == "uni:pytorch_model.bin"
    assert public_spec("timm:vit_tiny_patch16_224:/secret/ckpt.pth") == "timm:vit_tiny_patch16_224:ckpt.pth"
    assert public_spec("stain-stats") == "stain-stats"


def test_a_second_metrics_file_beside_the_first_shares_its_memorization_figure(evaluated, tmp_path, capsys):
    """Several evaluate runs into one folder (one metrics file each) share memorization.png; a figure with
    no metrics file of evaluate's beside it is the user's and is refused."""
    import shutil

    root, _ = evaluated
    folder = tmp_path / "metrics"
    shutil.copytree(root / "results", folder)
    assert (folder / "memorization.png").exists()
    args = ["evaluate", "--real", str(root / "real"), "--synthetic", str(root / "bundle"), "--size", "64",
            "--memorization"]
    code, _, err = run_cli([*args, "--out", str(folder / "second.json")], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--out", str(folder / "metrics.json")], capsys)  # its own file, again
    assert code == 0, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "memorization.png").write_bytes(b"my figure")
    code, _, err = run_cli([*args, "--out", str(tmp_path / "mine" / "m.json")], capsys)
    assert code == 1 and "memorization.png: exists and was not written by evaluate" in err
    assert (tmp_path / "mine" / "memorization.png").read_bytes() == b"my figure"


def test_a_random_init_timm_encoder_is_the_same_in_every_call():
    """FDs of different settings are compared with `timm:ARCH` when no weights can be downloaded: each call
    must build the same network, whatever the global random state."""
    import torch

    from htd_toolkit.clustering.encoders import get_encoder

    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    first = get_encoder("timm:resnet18")(images)
    torch.rand(1000)  # what ran before must not matter
    again = get_encoder("timm:resnet18")(images)
    assert np.array_equal(first, again)


def test_bootstrap_fd_difference_separates_real_differences_from_noise():
    from htd_toolkit.evaluate.fd import bootstrap_fd_difference

    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4))
    same_a, same_b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    shifted = rng.normal(size=(300, 4)) + 0.5
    difference, low, high = bootstrap_fd_difference(real, same_a, same_b)
    assert low < 0 < high and low < difference < high  # two samples of one distribution: no difference
    difference, low, high = bootstrap_fd_difference(real, shifted, same_a)
    assert 0 < low < difference < high and difference == pytest.approx(
        frechet_distance(real, shifted) - frechet_distance(real, same_a))


@pytest.mark.parametrize("case, message", [
    ("mask value", "mask value 7 is not a class index (K = 3, 255 = ignore)"),
    ("mask size", "mask of 16 x 16 for an image of 32 x 32"),
    ("no mask", "no mask.png column"),
    ("no image", "no image (png, jpg, webp) column"),
    ("id2label", "id2label.json does not name classes 0..K-1"),
    ("twelve classes", None),  # keys "10" and "11" sort before "2" as strings
    ("no classes", "id2label.json does not name classes 0..K-1 (keys [])"),
    ("null name", "id2label.json must give each class a distinct, non-empty name (names ['background', None, 5])"),
    ("same names", "id2label.json must give each class a distinct, non-empty name"),
    ("huge image", "(s0.png): an image of 9000 x 9000 px; the toolkit reads images of at most 8192 x 8192 px"),
    ("truncated mask", "(s0.mask.png): not a PNG, JPEG, WEBP image"),
])
def test_a_malformed_hub_dataset_is_one_line(tmp_path, capsys, monkeypatch, case, message):
    """Hub datasets are checked as local folders are: mask values, mask size, the columns, the class list, and
    images are decoded by the toolkit's reader (size limit from the header, corrupt files one line)."""
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN
    from tests.helpers import png_bytes, png_header

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    members = []
    for i in range(3):
        mask = np.zeros((16 if case == "mask size" else 32,) * 2, np.uint8)
        mask[:, 8:] = 7 if case == "mask value" else 2
        member = {"__key__": f"s{i}", "png": png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                  "mask.png": png_bytes(mask), "json": {}}
        if case == "no mask":
            member["other.png"] = member.pop("mask.png")
        if case == "no image":
            member["picture.bmp"] = member.pop("png")
        if case == "huge image":
            member["png"] = png_header(9000, 9000)
        if case == "truncated mask":
            member["mask.png"] = member["mask.png"][:40]
        members.append(member)
    import webdataset as wds

    with wds.TarWriter(str(folder / "data" / "train-00000.tar")) as sink:
        for member in members:
            sink.write(member)
    labels = {"0": "background", "1": "normal", "2": "tumor"}
    if case == "id2label":
        labels = {"1": "normal", "2": "tumor", "5": "x"}
    if case == "twelve classes":
        labels = {str(i): f"class {i}" for i in range(12)}
    labels = {"no classes": {}, "null name": {"0": "background", "1": None, "2": 5},
              "same names": dict.fromkeys("012", "tumor")}.get(case, labels)
    (folder / "id2label.json").write_text(json.dumps(labels))
    repo = f"user/malformed-{case.replace(' ', '-')}"
    api = HfApi(token=USER_TOKEN)
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    if message is None:
        assert load_set(repo, "train").classes == [f"class {i}" for i in range(12)]
        return
    with pytest.raises(UserError, match=re.escape(message)):
        load_set(repo, "train")


@pytest.mark.parametrize(("case", "message"), [("keys", None), ("empty image", "user/parquet-empty-image (row 1): the "
                                                                              "sample has no png or jpg or webp member")])
def test_a_parquet_hub_dataset_without_keys_is_read_and_an_empty_cell_is_one_line(tmp_path, monkeypatch, case, message):
    """A Hub dataset in Parquet (no WebDataset __key__ column) loads with its rows' numbers for keys; an image cell
    left empty is one line (both were a KeyError / AttributeError)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN
    from tests.helpers import png_bytes

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 8:] = 2
    images = [{"bytes": png_bytes(np.full((32, 32, 3), 40 * i, np.uint8)), "path": None} for i in range(3)]
    if case == "empty image":
        images[1] = None
    masks = [{"bytes": png_bytes(mask), "path": None}] * 3
    pq.write_table(pa.table({"png": images, "mask.png": masks}), folder / "data" / "train-00000.parquet")
    (folder / "README.md").write_text("---\ndataset_info:\n  features:\n  - name: png\n    dtype: image\n"
                                      "  - name: mask.png\n    dtype: image\n---\n")
    (folder / "id2label.json").write_text(json.dumps({"0": "background", "1": "normal", "2": "tumor"}))
    repo = f"user/parquet-{case.replace(' ', '-')}"
    HfApi(token=USER_TOKEN).create_repo(repo, repo_type="dataset")
    HfApi(token=USER_TOKEN).upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    if message is None:
        loaded = load_set(repo, "train")
        assert loaded.keys == ["row 0", "row 1", "row 2"] and loaded.images[2, 0, 0, 0] == 80
        return
    with pytest.raises(UserError, match=re.escape(message)):
        load_set(repo, "train")
