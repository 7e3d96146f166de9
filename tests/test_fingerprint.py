"""Class identity travels with the data: prepared folders, models and bundles carry the class fingerprint,
and the commands that combine two refuse a mismatch in one line naming both sides."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from htd_toolkit.classes import FINGERPRINT as FIELD
from htd_toolkit.classes import centroids_digest, class_fingerprint
from htd_toolkit.clustering.kmeans import KMeans, canonical_order
from htd_toolkit.models.htd_model import HTDConfig
from htd_toolkit.testing.embeddings import tissue_type_embeddings
from tests.helpers import run_cli


def test_prepared_folder_and_model_carry_the_fingerprint(prepared, model_dir):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest[FIELD] == class_fingerprint(manifest["classes"])
    assert manifest[FIELD]["classes"][1][0] == manifest["classes"][1]["name"]
    assert HTDConfig.load(model_dir).class_fingerprint == manifest[FIELD]


def test_a_bundle_records_the_model_fingerprint(model_dir, prepared, tmp_path, capsys):
    from tests.test_generate import gen_args

    assert run_cli(gen_args(model_dir, prepared, tmp_path / "bundle", 2), capsys)[0] == 0
    bundle = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert bundle[FIELD] == HTDConfig.load(model_dir).class_fingerprint


def renumbered(prepared, tmp_path):
    """A copy of the prepared folder whose classes were numbered by other centroids (same names)."""
    copy = tmp_path / "renumbered"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[FIELD] = class_fingerprint(manifest["classes"], "0123456789abcdef", "stain-stats")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_maps_or_crops_numbered_otherwise_are_refused(model_dir, prepared, tmp_path, capsys):
    from tests.test_generate import gen_args

    copy = renumbered(prepared, tmp_path)
    for maps, bank in ((copy, prepared / "crop_bank"), (prepared, copy / "crop_bank")):
        args = gen_args(model_dir, maps, tmp_path / "out", 2)
        args[args.index("--crop-bank") + 1] = str(bank)
        code, _, err = run_cli(args, capsys)
        assert code == 1 and "number their classes differently" in err and "0123456789abcdef" in err
        assert err.count("\n") == 1 and str(model_dir) in err
        assert not (tmp_path / "out" / "manifest.json").exists()


def test_evaluate_refuses_sets_numbered_otherwise(prepared, tmp_path, capsys):
    copy = renumbered(prepared, tmp_path)
    code, _, err = run_cli(["evaluate", "--real", str(prepared), "--synthetic", str(copy), "--out",
                            str(tmp_path / "eval"), "--encoders", "stain-stats"], capsys)
    assert code == 1 and "number their classes differently" in err


def test_a_hand_edited_fingerprint_is_refused(prepared, tmp_path, capsys):
    copy = tmp_path / "edited"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[FIELD]["classes"][1][0] = "tumour"  # no longer the manifest's classes
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(["evaluate", "--real", str(prepared), "--synthetic", str(copy), "--out",
                            str(tmp_path / "eval"), "--encoders", "stain-stats"], capsys)
    assert code == 1 and "does not match its classes" in err


def test_cluster_ids_follow_the_centroids_not_the_fit():
    """Fits with other seeds and another order of the same data find the same tissue types: they get the same
    ids, because ids are the canonical order of the centroids (ascending sum of coordinates; types whose sums
    differ by more than the fits' noise, as these, which are shifted apart along the all-ones direction)."""
    x, types = tissue_type_embeddings(3000, 16, 6, seed=3)
    x = x + (types[:, None] * 3.0).astype(np.float32)
    fits = [KMeans(k=6, seed=seed).fit(x[np.random.default_rng(seed).permutation(len(x))]) for seed in (0, 1, 2)]
    assert all(bool((f.centroids.sum(1).diff() > 0).all()) for f in fits)
    labels = [f.predict(x)[0] for f in fits]
    assert all((other == labels[0]).mean() > 0.99 for other in labels[1:])
    assert (labels[0] == types).mean() > 0.99  # type t, shifted furthest by t, is cluster t
    shuffled = fits[0].centroids[torch.tensor([3, 0, 5, 1, 4, 2])]
    assert torch.equal(canonical_order(shuffled), fits[0].centroids)


def test_the_centroid_digest_is_of_the_values_in_order():
    c = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert centroids_digest(c) == centroids_digest(c.astype(np.float64) + 1e-7)
    assert centroids_digest(c) != centroids_digest(c[::-1])


def test_resuming_on_data_numbered_otherwise_is_refused(prepared, tiny_base_sd15, tmp_path, capsys):
    from tests.test_training import demo_args, train

    out = tmp_path / "run"
    steps = ("--checkpointing_steps", "1", "--validation_steps", "0", "--resume_from_checkpoint", "latest")
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "1", *steps)) == 0
    copy = renumbered(prepared, tmp_path)
    capsys.readouterr()
    assert train(demo_args(tiny_base_sd15, copy, out, "--max_train_steps", "2", *steps)) == 1
    assert "checkpoint-1 and" in capsys.readouterr().err
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "2", *steps)) == 0
