"""The unannotated path on the real CC0 slide with the weight-free `stain-stats` encoder."""

import json
import shutil

import numpy as np
import pytest
import torch

from htd_toolkit.clustering.embed import read_embeddings
from htd_toolkit.clustering.kmeans import KMeans, bisect, heirs_of, improve_by_swaps, lloyd
from htd_toolkit.patches import unannotated as unannotated_module
from htd_toolkit.testing.embeddings import partition_inertia, tissue_type_embeddings
from tests.helpers import run_cli

# A coarse hand-made label map of CMU-1-Small-Region (level-0 boxes x0, y0, x1, y1), read off a
# 1/3-scale rendering with a 200-px grid. Background: glass left and top-right of the tissue strip.
# Epidermis: the purple keratinocyte band that runs down the middle of the strip (dense small nuclei,
# haematoxylin-rich). Dermis: pink collagen bundles on both sides of that band (eosin-rich, few nuclei).
BACKGROUND = [(0, 1300, 400, 2300), (1900, 100, 2200, 500), (0, 200, 500, 900)]
EPIDERMIS = [(1200, 1600, 1400, 1800), (1200, 1800, 1400, 2000), (1200, 2000, 1400, 2200)]
DERMIS = [(600, 1600, 800, 1800), (800, 2400, 1000, 2600), (1400, 2400, 1600, 2600), (1400, 2200, 1600, 2400),
          (600, 2400, 800, 2600)]
ARGS = ["--encoder", "stain-stats", "--k", "4", "--mpp", "1.0", "--tile-size", "56", "--patch-size", "128",
        "--stride", "64", "--split", "1,0,0", "--per-slide", "2000"]


def tiles_in(boxes, grid, tile0):
    """Labels of the tiles whose centre lies in one of the boxes."""
    labels = []
    for row in range(grid.shape[0]):
        for col in range(grid.shape[1]):
            cx, cy = (col + 0.5) * tile0, (row + 0.5) * tile0
            if any(x0 <= cx < x1 and y0 <= cy < y1 for x0, y0, x1, y1 in boxes):
                labels.append(int(grid[row, col]))
    return np.array(labels)


@pytest.fixture(scope="module")
def slides_dir(cc0_pyramid, tmp_path_factory):
    root = tmp_path_factory.mktemp("unannotated")
    (root / "slides").mkdir()
    shutil.copy(cc0_pyramid, root / "slides" / "skin.tif")
    return root / "slides"


@pytest.fixture(scope="module")
def prepared_unannotated(slides_dir, tmp_path_factory):
    from htd_toolkit.cli import main

    out = tmp_path_factory.mktemp("un-out") / "out"
    assert main(["prepare", "unannotated", "--slides", str(slides_dir), "--out", str(out), *ARGS,
                 "--dataset-name", "TCGA-TEST", "--license", "cc-by-4.0"]) == 0
    return out


def assignment(out):
    path = next((out / "clusters" / "assignments").glob("*.npz"))
    with np.load(path) as data:
        return data["grid"], int(data["tile0"])


def test_clusters_separate_background_tissue_epidermis_and_dermis(prepared_unannotated):
    grid, tile0 = assignment(prepared_unannotated)
    assert tile0 == 112  # 56 px at 1.0 µm/px from the 0.499 µm/px base
    background = tiles_in(BACKGROUND, grid, tile0)
    assert len(background) > 20 and (background == 0).mean() > 0.9
    epidermis, dermis = tiles_in(EPIDERMIS, grid, tile0), tiles_in(DERMIS, grid, tile0)
    # loose dermis has glass between its collagen bundles: some of its tiles fall under the tissue threshold
    assert len(epidermis) >= 5 and len(dermis) >= 15 and (epidermis > 0).mean() >= 0.8 and (dermis > 0).mean() > 0.6
    epidermis, dermis = epidermis[epidermis > 0], dermis[dermis > 0]
    epi_type = np.bincount(epidermis).argmax()
    derm_type = np.bincount(dermis).argmax()
    assert epi_type != derm_type
    assert (epidermis == derm_type).mean() < 0.3 and (dermis == epi_type).mean() < 0.3


def test_pseudo_map_class_i_is_the_tiles_nearest_to_centroid_i(prepared_unannotated):
    """Every tile's class is 1 + the index of its nearest saved centroid (float64 brute force), the ids are
    the centroids' canonical order, and the manifest's fingerprint names those centroids."""
    from htd_toolkit.classes import FINGERPRINT as FIELD
    from htd_toolkit.classes import centroids_digest

    centroids = KMeans.load(prepared_unannotated / "clusters" / "centroids.safetensors").centroids.double().numpy()
    assert np.all(np.diff(centroids.sum(1)) > 0)
    grid, _ = assignment(prepared_unannotated)
    features, cells, _ = read_embeddings(next((prepared_unannotated / "embeddings").glob("*.safetensors")))
    distances = ((features.astype(np.float64)[:, None] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(grid[cells[:, 1], cells[:, 0]], distances.argmin(1) + 1)
    manifest = json.loads((prepared_unannotated / "manifest.json").read_text())
    assert manifest[FIELD]["centroids"] == centroids_digest(centroids) and manifest[FIELD]["encoder"] == "stain-stats"


def test_new_slides_in_another_folder_take_the_given_centroids_and_their_ids(prepared_unannotated, slides_dir,
                                                                             tmp_path, capsys):
    from htd_toolkit.classes import FINGERPRINT as FIELD

    given = prepared_unannotated / "clusters" / "centroids.safetensors"
    out = tmp_path / "new"
    args = ["prepare", "unannotated", "--slides", str(slides_dir), "--out", str(out), *ARGS,
            "--dataset-name", "TCGA-TEST", "--license", "cc-by-4.0"]
    code, _, err = run_cli([*args, "--centroids", str(given)], capsys)
    assert code == 0, err
    theirs, ours = (json.loads((folder / "manifest.json").read_text())[FIELD] for folder in (prepared_unannotated, out))
    assert ours == theirs and ours["centroids"]
    assert np.array_equal(assignment(out)[0], assignment(prepared_unannotated)[0])
    other_k = [*args, "--centroids", str(given)]
    other_k[other_k.index("--k") + 1], other_k[other_k.index("--out") + 1] = "3", str(tmp_path / "k3")
    code, _, err = run_cli(other_k, capsys)
    assert code == 1 and "--centroids" in err and "--k 3" in err


def test_output_is_the_annotated_dataset_folder(prepared_unannotated):
    out = prepared_unannotated
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == ["background"] + [f"tissue type {i:03d}" for i in range(1, 5)]
    assert manifest["source"] == {"name": "TCGA-TEST", "license": "cc-by-4.0", "format": "pseudo"}
    assert manifest["config"]["encoder"] == "stain-stats"
    assert manifest["splits"]["train"] > 5 and manifest["crop_bank"]
    assert (out / "assets" / "cluster_gallery.png").exists()
    centroids = KMeans.load(out / "clusters" / "centroids.safetensors")
    assert centroids.k == 4 and centroids.meta["encoder"] == "stain-stats" and centroids.meta["tile_size"] == 56
    features, cells, meta = read_embeddings(next((out / "embeddings").glob("*.safetensors")))
    assert features.shape == (len(cells), 55) and meta["tile0"] == 112


def test_maps_are_aligned_with_images(prepared_unannotated):
    from htd_toolkit.annotations.pseudo import PseudoMapSource
    from tests.test_prepare_annotated import decode, samples_of

    grid_path = next((prepared_unannotated / "clusters" / "assignments").glob("*.npz"))
    source = PseudoMapSource(grid_path)
    glass, tissue = [], []
    for _, members in samples_of(prepared_unannotated):
        meta = json.loads(members["json"])
        mask, image = decode(members, "mask.png"), decode(members, "png").astype(float)
        size0 = meta["level0_size"]
        assert np.array_equal(mask, source.label_box((meta["x"], meta["y"], size0, size0), 128, 128))
        saturation = image.max(axis=2) - image.min(axis=2)
        if (mask == 0).any():
            glass.append(saturation[mask == 0].mean())
        tissue.append(saturation[mask > 0].mean())
    assert glass and np.mean(glass) < 0.75 * np.mean(tissue)  # background tiles sit mostly on unstained glass


def test_same_seed_same_bytes_and_stages_on_their_own(prepared_unannotated, slides_dir, tmp_path, capsys):
    out = tmp_path / "staged"
    common = ["--slides", str(slides_dir), "--out", str(out)]
    assert run_cli(["embed", *common, "--encoder", "stain-stats", "--mpp", "1.0", "--tile-size", "56"], capsys)[0] == 0
    code, _, err = run_cli(["cluster", *common, "--encoder", "stain-stats", "--k", "4", "--mpp", "1.0",
                            "--tile-size", "56", "--per-slide", "2000"], capsys)
    assert code == 0 and '"k": 4' in err
    assert run_cli(["pseudo-maps", *common, "--k", "4", "--mpp", "1.0", "--patch-size", "128", "--stride", "64",
                    "--split", "1,0,0", "--license", "cc-by-nc-4.0"], capsys)[0] == 0
    first = json.loads((prepared_unannotated / "manifest.json").read_text())
    second = json.loads((out / "manifest.json").read_text())
    assert first["shards"] == second["shards"] and first["crop_bank"] == second["crop_bank"]
    assert second["source"] == {"name": "unannotated", "license": "cc-by-nc-4.0", "format": "pseudo"}


def test_resume_after_an_interruption_and_new_slides_use_the_saved_centroids(slides_dir, tmp_path, capsys,
                                                                               monkeypatch):
    slides = tmp_path / "slides"
    shutil.copytree(slides_dir, slides)
    shutil.copy(slides / "skin.tif", slides / "skin2.tif")
    out = tmp_path / "out"
    calls = []
    real = unannotated_module.embed_slide

    def interrupted(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(unannotated_module, "embed_slide", interrupted)
    code, _, _ = run_cli(["prepare", "unannotated", "--slides", str(slides), "--out", str(out), *ARGS], capsys)
    assert code != 0 and len(list((out / "embeddings").glob("*.safetensors"))) == 1
    assert not list((out / "embeddings").glob("*.partial"))
    calls.clear()
    monkeypatch.setattr(unannotated_module, "embed_slide", lambda path, *a, **k: calls.append(path.name) or real(
        path, *a, **k))
    code, _, err = run_cli(["prepare", "unannotated", "--slides", str(slides), "--out", str(out), *ARGS], capsys)
    assert code == 0, err
    assert len(calls) == 1  # only the unfinished slide was embedded again
    centroids = (out / "clusters" / "centroids.safetensors").read_bytes()
    shutil.copy(slides / "skin.tif", slides / "skin3.tif")  # a new slide, assigned without refitting
    code, _, err = run_cli(["prepare", "unannotated", "--slides", str(slides), "--out", str(out), *ARGS], capsys)
    assert code == 0, err
    assert (out / "clusters" / "centroids.safetensors").read_bytes() == centroids
    assert len(list((out / "clusters" / "assignments").glob("*.npz"))) == 3


@pytest.mark.parametrize("case, message", [
    ("unknown encoder", "known encoders are"),
    ("unreadable slide", "cannot read the slide"),
])
def test_bad_input(slides_dir, tmp_path, capsys, case, message):
    slides = tmp_path / "slides"
    slides.mkdir()
    args = list(ARGS)
    if case == "unknown encoder":
        shutil.copy(slides_dir / "skin.tif", slides / "skin.tif")
        args[1] = "dinov9"
    else:
        (slides / "broken.tif").write_bytes(b"not a tiff" * 50)
    code, _, err = run_cli(["prepare", "unannotated", "--slides", str(slides), "--out", str(tmp_path / "o"), *args],
                           capsys)
    assert code == 1 and message in err and "Traceback" not in err, err


def test_kmeans_matches_a_full_lloyd_reference():
    from sklearn.cluster import KMeans as SkKMeans

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16)) * 4
    x = (centers[rng.integers(0, 8, 4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    ours = KMeans(k=8, seed=0).fit(x)
    labels, dists = ours.predict(x)
    reference = SkKMeans(8, n_init=3, random_state=0).fit(x)
    assert dists.sum() <= reference.inertia_ * 1.01
    assert len(np.unique(labels)) == 8
    hierarchical = KMeans(k=8, seed=0, hierarchical=True).fit(x)
    coarse = KMeans(k=4, seed=0).fit(x)  # the first level of the hierarchy: splitting must improve on it
    assert len(hierarchical.centroids) == 8
    assert hierarchical.predict(x)[1].sum() < 0.8 * coarse.predict(x)[1].sum()


@pytest.mark.parametrize("seed", [0, 2])
def test_swaps_find_the_tissue_types_that_lloyd_from_kmeans_plus_plus_misses(seed):
    x, types = tissue_type_embeddings(20_000, 256, 40, seed)
    truth = partition_inertia(x, types)
    plain = KMeans(k=40, seed=0, swap_rounds=0).fit(x).predict(x)[1].sum() / truth
    swapped = KMeans(k=40, seed=0).fit(x).predict(x)[1].sum() / truth
    assert plain > 1.05  # seeding put two centroids in some types and none in others
    assert swapped < 1.005


def test_heirs_are_the_commonest_second_nearest_cluster():
    generator = torch.Generator().manual_seed(0)
    k = 7
    for _ in range(20):  # cluster 6 never nearest: its own heir
        labels, second = torch.randint(k - 1, (300,), generator=generator), torch.randint(k, (300,), generator=generator)
        table = torch.bincount(labels * k + second, minlength=k * k).view(k, k)
        expected = [int(row.argmax()) if row.sum() else c for c, row in enumerate(table)]
        found = heirs_of(labels, second, k)
        assert [int(table[c, h]) for c, h in enumerate(found)] == [int(table[c, h]) for c, h in enumerate(expected)]
        assert found[k - 1] == k - 1


def test_one_cluster_is_the_mean():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    np.testing.assert_allclose(KMeans(k=1).fit(x).centroids.numpy()[0], x.mean(0), atol=1e-5)


def test_swaps_never_raise_the_inertia_on_data_without_clusters():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 32, generator=generator)
    start, inertia, _ = lloyd(x, x[:25].clone(), 50, 1e-4)
    _, improved = improve_by_swaps(x, start, 50, 1e-4, torch.Generator().manual_seed(1))
    assert improved <= inertia


def test_bisect_separates_two_types_and_reports_the_error_it_removes():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.concatenate([rng.normal(0, 1, (300, 64)), rng.normal(3, 1, (100, 64))]).astype(np.float32))
    gain, halves, side = bisect(x, torch.Generator().manual_seed(0))
    assert sorted(side.sum().item() for side in (side, ~side)) == [100, 300]
    error = lambda rows: float(((rows - rows.mean(0)) ** 2).sum())  # noqa: E731
    assert gain == pytest.approx(error(x) - error(x[side]) - error(x[~side]), rel=1e-3)
    assert gain == pytest.approx(300 * 100 / 400 * 9 * 64, rel=0.05)  # the between-type squared error
    assert {round(float(h.mean())) for h in halves} == {0, 3}


def test_pseudo_maps_with_another_k_than_the_fitted_centroids_is_refused(prepared_unannotated, slides_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    shutil.copytree(prepared_unannotated, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ["--k", "2", "--mpp", "1.0", "--patch-size", "128", "--stride", "64", "--split", "1,0,0"]
    code, _, err = run_cli(["pseudo-maps", "--slides", str(slides_dir), "--out", str(out), *args], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "holds a `prepare unannotated` run with other options" in err and "k = 4 there, not 2" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damaged, command", [("clusters/centroids.safetensors", "pseudo-maps"),
                                              ("embeddings/*.safetensors", "cluster")])
def test_a_damaged_centroids_or_embeddings_file_is_one_line(prepared_unannotated, slides_dir, tmp_path, capsys,
                                                            damaged, command):
    """Centroids are copied between machines to assign new slides without refitting: a file that is not
    one of ours (no metadata, cut short) names itself, never a traceback."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    shutil.copytree(prepared_unannotated, out)
    path = next(out.glob(damaged))
    save_file({"centroids": torch.zeros(4, 55)}, path)  # no "htd" metadata
    args = ["--k", "4", "--mpp", "1.0", "--per-slide", "2000"] if command == "cluster" else \
        ["--k", "4", "--mpp", "1.0", "--patch-size", "128", "--stride", "64", "--split", "1,0,0",
         "--dataset-name", "TCGA-TEST", "--license", "cc-by-4.0"]  # the folder's options: it is continued
    if command == "cluster":
        args += ["--encoder", "stain-stats", "--tile-size", "56"]
        (out / "clusters" / "centroids.safetensors").unlink()  # so the embeddings are read to fit again
    code, _, err = run_cli([command, "--slides", str(slides_dir), "--out", str(out), *args], capsys)
    assert code == 1 and f"{path.name}: not an htd-toolkit" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("case", ["missing", "rows", "dims", "nan", "int", "meta"])
def test_bad_given_centroids_are_one_line_and_leave_the_folder_usable(prepared_unannotated, slides_dir, tmp_path,
                                                                     capsys, case):
    """A --centroids file is checked by what it holds (not what its metadata says) before anything is written."""
    from safetensors.torch import load_file, save_file

    good = prepared_unannotated / "clusters" / "centroids.safetensors"
    centroids, meta = load_file(good)["centroids"], KMeans.load(good).meta
    bad = tmp_path / "bad.safetensors"
    tensors = {"rows": torch.cat([centroids + 100, centroids]), "dims": centroids[:, :2], "nan": centroids * np.nan,
               "int": centroids.long(), "meta": centroids}
    if case != "missing":
        save_file({"centroids": tensors[case].contiguous()}, bad,
                  metadata={"htd": json.dumps([1, 2] if case == "meta" else meta)})
    out = tmp_path / "out"
    args = ["prepare", "unannotated", "--slides", str(slides_dir), "--out", str(out), *ARGS]
    code, _, err = run_cli([*args, "--centroids", str(bad)], capsys)
    assert code == 1 and "Traceback" not in err and f"error: --centroids {bad}" in err and "delete it" not in err, err
    assert not (out / "clusters" / "centroids.safetensors").exists()
    retry = [*args, "--centroids", str(good)] + (["--overwrite"] if case == "dims" else [])  # known after embedding
    code, _, err = run_cli(retry, capsys)
    assert code == 0, err
