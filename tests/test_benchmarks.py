"""The benchmark scripts run at toy sizes (their figures are measured by hand, not asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_prepare_benchmark_runs(monkeypatch, capsys, sample_slide):
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--repeats", "1", "--patch-size", "512"])
    load("prepare").main()
    import json

    out = capsys.readouterr().out
    cases = json.loads(out.strip().splitlines()[-1])["cases"]
    assert len(cases) == 3 and "mosaic" in cases[2]["case"]
    for case in cases:  # OpenSlide reads every test slide since the pyramids' levels are top-level pages
        assert case["ratio"] > 0 and case["openslide_ratio"] > 0 and case["pixel_diff_openslide"] < 2


def test_train_benchmark_runs():
    row = load("train").run("toy", batch=2, compile_=False, reps=1)
    assert row["plain_samples_per_s"] > 0 and row["ours_samples_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["ours_samples_per_s"] / row["plain_samples_per_s"], rel=1e-6)


def test_generate_benchmark_runs(tmp_path):
    bench = load("generate")
    fixtures = bench.write_fixtures(tmp_path, "toy")
    row = bench.run(fixtures, "toy", batch=2, images=4, steps=2, guidance=2.0)
    assert row["stock_images_per_s"] > 0 and row["ours_images_per_s"] > 0 and row["images"] == 4
    assert row["ratio"] == pytest.approx(row["ours_images_per_s"] / row["stock_images_per_s"], rel=1e-6)
    assert row["stock_first_batch_s"] > 0 and row["ours_first_batch_s"] > 0
    with pytest.raises(SystemExit, match="two batches"):
        bench.run(fixtures, "toy", batch=4, images=4, steps=2, guidance=2.0)
    row = bench.streaming_cost(fixtures, "toy", batch=1, images=4, steps=2, guidance=2.0, repeats=1)
    assert row["streaming_on_images_per_s"] > 0 and row["streaming_off_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["streaming_on_images_per_s"] / row["streaming_off_images_per_s"])


def test_cluster_benchmark_runs():
    row = load("cluster").run(n=3000, dim=16, k=5)
    assert row["ours_s"] > 0 and row["sklearn_minibatch_s"] > 0 and 0.5 < row["inertia_ratio"] < 1.5
    assert row["faiss_version"] and len(row["faiss_runs"]) == 8 and row["best_inertia"] > 0
    assert {"faiss_speedup", "faiss_inertia_ratio", "faiss_matched"} <= set(row)
    assert row["ours_without_swaps_s"] > 0 and row["generating_types_inertia"] <= 1.01 * row["ours_inertia"]


def test_gpu_suite_checks_run_at_toy_shapes(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--shape", "toy", "--skip", "generate"])
    load("gpu_suite").main()
    import json

    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [c["ok"] for c in report["checks"]] == [True, True, True]
    assert [r["workload"] for r in report["rows"]] == ["train", "embed (vit_tiny_patch16_224)"]
    assert "| train | 2 |" in capsys.readouterr().out
    rows = (tmp_path / "gpu_suite.md").read_text().splitlines()[2:]  # written as the parts finish
    assert [row.split(" | ")[0] for row in rows] == ["| train", "| embed (vit_tiny_patch16_224)"]


def test_gpu_suite_compiled_rows_reuse_the_eager_baselines(monkeypatch, capsys, tmp_path):
    """The --compile path end to end, with torch.compile stubbed out (compiling takes minutes on a CPU)."""
    import json

    import torch

    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--shape", "toy", "--skip", "checks", "embed", "--compile",
                                      "--gen-batch", "2", "--gen-images", "4", "--gen-steps", "2",
                                      "--gen-batch-sweep", "3"])
    load("gpu_suite").main()
    rows = {r["workload"]: r for r in json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]}
    assert list(rows) == ["generate", "train", "generate (compiled)", "train (compiled)", "generate (ours at batch 3)"]
    assert rows["generate (ours at batch 3)"]["images"] == 6  # two batches at least
    assert rows["generate (ours at batch 3)"]["stock_images_per_s"] == rows["generate"]["stock_images_per_s"]
    for name, unit in (("generate", "stock_images_per_s"), ("train", "plain_samples_per_s")):
        assert rows[f"{name} (compiled)"][unit] == rows[name][unit]  # measured once, in the eager row
    assert rows["generate (compiled)"]["compiled"] and not rows["generate (compiled)"]["stock_compiled"]


def test_evaluate_benchmark_agrees_with_the_reference_implementations():
    rows = {r["metric"]: r for r in load("evaluate").run(n=400, dim=32, fd_dim=64)}
    pr = rows["precision/recall"]
    assert pr["ours_values"] == pytest.approx(pr["stock_values"]) and 0 < pr["ours_values"][0] < 1
    assert rows["nearest real image (memorization)"]["same_neighbour"] == 1.0
    fd = rows["Fréchet distance (from statistics)"]
    assert fd["ours_values"] == pytest.approx(fd["stock_values"], rel=1e-6)


def test_gpu_suite_records_a_failing_part_and_goes_on(monkeypatch, capsys, tmp_path):
    import json

    suite = load("gpu_suite")
    monkeypatch.setattr(suite, "check_training_learns", lambda shape: 1 / 0)
    monkeypatch.setattr(suite, "check_path_on_device", lambda root: {"check": "path", "ok": True})
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--shape", "toy", "--skip", "generate", "train"])
    suite.main()
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["checks"][1] == {"part": 1, "error": "ZeroDivisionError: division by zero", "ok": False}
    assert report["checks"][2]["ok"] and report["rows"][0]["workload"].startswith("embed")  # it went on


@pytest.mark.slow  # four fine-tunes, generations and evaluations: minutes on 2 cores even at toy size
def test_fidelity_benchmark_runs(monkeypatch, capsys, tmp_path):
    import json

    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--shape", "toy", "--out", str(tmp_path)])
    load("fidelity").main()
    out = capsys.readouterr().out
    assert all(f"| {mode} |" in out for mode in ("none", "embedding", "canvas", "adapter"))
    assert (tmp_path / "fidelity.png").exists() and (tmp_path / "fidelity.json").exists()
    # --pool: the run's images taken twice, as two seeds' runs would be
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--pool", str(tmp_path), str(tmp_path), "--modes",
                                      "none,adapter", "--out", str(tmp_path / "pooled")])
    load("fidelity").main()
    pooled = json.loads((tmp_path / "pooled" / "pooled.json").read_text())
    assert pooled["images"] == {"none": 8, "adapter": 8}
    assert set(pooled["fd_vs_none"]) == {"adapter"} and len(pooled["fd_vs_none"]["adapter"]["stain-stats"]) == 3
    assert "| adapter | 8 |" in capsys.readouterr().out


@pytest.mark.slow  # pretraining a base, two fine-tunes and their scores at 256 px: about 10 minutes on 2 cores
@pytest.mark.timeout(1800)
def test_gpu_suite_runs_the_fidelity_ablation_at_256_px_on_its_own_base(monkeypatch, capsys, tmp_path):
    import json

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--shape", "toy", "--skip", "checks", "generate", "train",
                                      "embed", "--fidelity", "toy256"])
    load("gpu_suite").main()
    part = json.loads((tmp_path / "gpu_suite.json").read_text())["fidelity"][0]
    assert part["ok"] and part["base"]["patch_size"] == 256 and part["base"]["mpp"] == 0.5
    report = json.loads((tmp_path / "fidelity" / "fidelity.json").read_text())
    assert report["settings"]["patch"] == 256 and set(report["results"]) == {"none", "adapter"}
    assert "| adapter |" in (tmp_path / "gpu_suite.md").read_text()
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tmp_path / "fidelity" / "base", safety_checker=None)
    assert base.unet.config.sample_size * base.vae_scale_factor == 256  # its default image side


def test_slide_benchmark_runs(tmp_path):
    from htd_toolkit.testing.slides import fixture_crop_bank

    bench = load("slide")
    bank = fixture_crop_bank(tmp_path)
    map_path = bench.write_map(tmp_path / "map.png", 128)
    for run in (bench.run_ours, bench.run_naive):
        figures = run(128, 1, tmp_path, bank, map_path)
        assert figures["seconds"] > 0 and figures["working_mb"] >= 0 and figures["seam_ratio"] > 0


@pytest.mark.slow  # the fidelity preparation of the CC0 slide (about a minute), then seconds of generation
def test_glass_benchmark_runs(tmp_path):
    results = load("glass").main(["--shape", "toy", "--out", str(tmp_path)])
    assert (tmp_path / "glass.json").exists()
    for part in ("patches", "slide"):
        assert results[part]["keep_glass"]["background_glass"] > results[part]["model_only"]["background_glass"]
    assert 0 <= results["slide"]["keep_glass"]["outline_iou"] <= 1


@pytest.mark.slow  # the fidelity preparation of the CC0 slide (about a minute), then seconds of training
def test_tstr_benchmark_runs(tmp_path):
    results = load("tstr").main(["--shape", "toy", "--out", str(tmp_path)])
    assert set(results["sets"]) == {"real", "synthetic, model only", "synthetic, keep glass"}
    assert all(0 <= s["miou_mean"] <= 1 for s in results["sets"].values()) and results["pairs"] == 8
