"""`htd-toolkit generate`, `push` and `demo` on the tiny base, against the local Hub test server."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from htd_toolkit.generate import bundle as bundle_module
from htd_toolkit.testing.hubserver import READ_TOKEN, USER_TOKEN
from tests.helpers import run_cli


def gen_args(model_dir, prepared, out, n=6, *extra):
    return ["generate", "--model", str(model_dir), "--maps", str(prepared), "--crop-bank",
            str(prepared / "crop_bank"), "--num-samples", str(n), "--out", str(out), "--batch-size", "4",
            "--steps", "3", "--shard-size", "4", *extra]


@pytest.fixture(scope="module")
def bundle_dir(model_dir, prepared, tmp_path_factory):
    from htd_toolkit.cli import main

    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(gen_args(model_dir, prepared, out)) == 0
    return out


def test_bundle_layout_manifest_and_schema(bundle_dir, prepared):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 6} and [s["samples"] for s in manifest["shards"]] == [4, 2]
    for shard in manifest["shards"]:
        assert hashlib.sha256((bundle_dir / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert json.loads((bundle_dir / "id2label.json").read_text()) == {"0": "background", "1": "normal", "2": "tumor"}
    assert (bundle_dir / "assets" / "sample_grid.png").exists() and (bundle_dir / "assets" / "heterogeneity.png").exists()
    from htd_toolkit.data.sources import load_maps

    map_keys = [entry.key for entry in load_maps(prepared, "train")[0]]
    rows = load_dataset(str(bundle_dir), split="train", cache_dir=str(bundle_dir.parent / "cache"))
    assert len(rows) == 6 and rows.column_names[:4] == ["png", "mask.png", "json", "__key__"]
    for i, row in enumerate(rows):
        meta = row["json"]
        assert row["__key__"] == f"syn-{i:08d}" and row["png"].size == (64, 64)
        mask = np.asarray(row["mask.png"])
        assert row["mask.png"].mode == "L" and set(np.unique(mask)) <= {0, 1, 2}
        assert meta["source"] == "synthetic" and meta["crop_mode"] == "adapter" and meta["steps"] == 3
        assert meta["crops"] and all(c["key"] and c["class"] in np.unique(mask) for c in meta["crops"])
        assert meta["model"] == "local:m" and meta["map_key"]
        assert meta["class_fractions"] == pytest.approx((np.bincount(mask.ravel(), minlength=3) / mask.size).tolist(),
                                                        abs=1e-6)
        assert meta["map_key"] == map_keys[i % len(map_keys)]  # sample i uses map i mod M


def test_card_validates_and_parses_back(bundle_dir):
    card = DatasetCard.load(bundle_dir / "README.md")
    card.validate(repo_type="dataset")  # huggingface_hub's validation (against the test server's endpoint)
    data = DatasetCardData(**card.data.to_dict())
    assert data.license == "cc0-1.0" and "histopathology" in data.tags and data.task_ids == ["semantic-segmentation"]
    assert data.configs[0]["data_files"][0]["path"] == "data/train-*.tar"
    assert data.task_categories == ["image-segmentation", "image-to-image"] and data.size_categories == ["n<1K"]
    assert "| 2 | tumor | `#d62728` |" in card.text and "not for clinical use" in card.text.lower()


def test_interrupted_generation_resumes_byte_identical(bundle_dir, model_dir, prepared, tmp_path, capsys, monkeypatch):
    out = tmp_path / "resumed"
    real = bundle_module.run_shards

    def crash_after_first_shard(pipe, todo, *args):
        real(pipe, todo[:1], *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "run_shards", crash_after_first_shard)
    code, _, _ = run_cli(gen_args(model_dir, prepared, out), capsys)
    assert code != 0 and (out / "data" / "train-00000.tar").exists() and not (out / "manifest.json").exists()
    first_shard = (out / "data" / "train-00000.tar").stat().st_mtime_ns
    monkeypatch.setattr(bundle_module, "run_shards", real)
    code, _, err = run_cli(gen_args(model_dir, prepared, out), capsys)
    assert code == 0, err
    assert (out / "data" / "train-00000.tar").stat().st_mtime_ns == first_shard  # not rewritten
    for name in ("data/train-00000.tar", "data/train-00001.tar", "manifest.json"):
        assert (out / name).read_bytes() == (bundle_dir / name).read_bytes(), name
    assert json.loads((out / ".work" / "shards" / "00000.json").read_text())["last_key"] == "syn-00000003"
    timing = bundle_module.read_throughput(out)  # this run made shard 1 only: 2 images in one batch
    assert (timing.images, timing.first_batch_images) == (2, 2) and timing.steady_images_per_s is None
    assert 0 < timing.first_batch_s <= timing.total_s < 120  # seconds of this run, not a clock reading
    assert "2 images in" in err
    code, _, err = run_cli(gen_args(model_dir, prepared, out), capsys)
    assert code == 0 and bundle_module.read_throughput(out) is None and "images in" not in err


def test_auto_batch_size_halves_on_out_of_memory_with_the_same_bytes(model_dir, prepared, bundle_dir, tmp_path,
                                                                    capsys, monkeypatch):
    from htd_toolkit.models.pipeline import HTDPipeline

    real, sizes = HTDPipeline.__call__, []

    def memory_for_two(self, *args, **kwargs):  # a card that fits two images at a time
        sizes.append(len(kwargs["generator"]))
        if sizes[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HTDPipeline, "__call__", memory_for_two)
    out = tmp_path / "auto"
    code, _, err = run_cli(gen_args(model_dir, prepared, out, 6, "--auto-batch-size"), capsys)
    assert code == 0, err
    assert sizes[:2] == [4, 3] and set(sizes[2:]) == {2}  # accelerate's rule: x 0.9 per failure, 2 fits
    assert bundle_module.read_throughput(out).batch_size == 2 and "at batch size 2" in err
    same_samples(out, bundle_dir)


def same_samples(out, reference, grey_levels: int = 2):
    """Keys, masks and metadata equal; pixels within `grey_levels` (kernels round differently)."""
    from htd_toolkit.data.shards import read_tar
    from tests.test_prepare_annotated import decode

    for name in ("data/train-00000.tar", "data/train-00001.tar"):
        for (key_a, a), (key_b, b) in zip(read_tar(out / name), read_tar(reference / name), strict=True):
            a, b = dict(a), dict(b)
            assert key_a == key_b and a["json"] == b["json"] and a["mask.png"] == b["mask.png"]
            assert np.abs(decode(a, "png").astype(int) - decode(b, "png").astype(int)).max() <= grey_levels


def test_batches_never_span_shards_and_follow_the_todo_order():
    plan = bundle_module.batch_plan([2, 0], {0: 4, 1: 4, 2: 3}, shard_size=4, batch_size=3)
    assert plan == [(2, [8, 9, 10]), (0, [0, 1, 2]), (0, [3])]


def test_out_of_memory_is_one_line_and_keeps_finished_shards(model_dir, prepared, tmp_path, capsys, monkeypatch):
    from htd_toolkit.models.pipeline import HTDPipeline

    real, calls = HTDPipeline.__call__, []

    def second_batch_runs_out(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HTDPipeline, "__call__", second_batch_runs_out)
    out = tmp_path / "oom"
    code, _, err = run_cli(gen_args(model_dir, prepared, out), capsys)
    assert code == 1 and "out of GPU memory at --batch-size 4: lower it" in err and "Traceback" not in err, err
    assert (out / "data" / "train-00000.tar").exists() and not (out / "data" / "train-00001.tar").exists()


def test_throughput_separates_the_first_batch():
    timing = bundle_module.Throughput(images=12, first_batch_images=4, first_batch_s=5.0, total_s=7.0)
    assert timing.steady_images_per_s == 4.0
    assert "4.00 images/s after the first batch (first batch 5.0 s" in timing.summary()


def test_push_is_private_idempotent_and_token_free(bundle_dir, tmp_path, capsys, monkeypatch, hf_cache):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    code, out, err = run_cli(["push", str(copy), "user/synthetic"], capsys)
    assert code == 0, err
    api = HfApi(token=USER_TOKEN)
    info = api.dataset_info("user/synthetic")
    assert info.private is True
    files = set(api.list_repo_files("user/synthetic", repo_type="dataset"))
    assert {"README.md", "manifest.json", "id2label.json", "data/train-00000.tar", "assets/sample_grid.png"} <= files
    assert not any(f.startswith(".work") for f in files)
    code, _, err = run_cli(["push", str(copy), "user/synthetic"], capsys)
    assert code == 0, err
    assert api.dataset_info("user/synthetic").sha == info.sha  # a second push makes no commit
    rows = load_dataset("user/synthetic", split="train", token=USER_TOKEN, cache_dir=str(hf_cache))
    local = load_dataset(str(copy), split="train", cache_dir=str(tmp_path / "local-cache"))
    assert len(rows) == 6 and rows.features["png"].__class__.__name__ == "Image"
    for a, b in zip(rows, local, strict=True):
        assert np.array_equal(np.asarray(a["png"]), np.asarray(b["png"]))
        assert np.array_equal(np.asarray(a["mask.png"]), np.asarray(b["mask.png"])) and a["json"] == b["json"]
    card = DatasetCard.load(copy / "README.md")
    assert 'load_dataset("user/synthetic"' in card.text
    logs = out + err + capsys.readouterr().err
    for path in copy.rglob("*"):
        if path.is_file():
            assert USER_TOKEN.encode() not in path.read_bytes(), path
    assert USER_TOKEN not in logs


def test_a_public_repo_takes_a_push_only_with_public_and_the_visibility_is_printed(bundle_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    api = HfApi(token=USER_TOKEN)
    code, _, err = run_cli(["push", str(copy), "user/went-public", "--public"], capsys)
    assert code == 0 and "user/went-public: a public dataset repo" in err
    public_sha = api.dataset_info("user/went-public").sha
    (copy / "assets" / "sample_grid.png").write_bytes((copy / "assets" / "heterogeneity.png").read_bytes())
    code, _, err = run_cli(["push", str(copy), "user/went-public"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "user/went-public is a public dataset repo: pass --public to push into it, or make it private" in err
    info = api.dataset_info("user/went-public")
    assert info.sha == public_sha and info.private is False

    api.update_repo_settings("user/went-public", repo_type="dataset", private=True)  # as the refusal suggests
    code, _, err = run_cli(["push", str(copy), "user/went-public"], capsys)
    assert code == 0 and "user/went-public: a private dataset repo" in err
    code, _, err = run_cli(["push", str(copy), "user/went-public", "--public"], capsys)  # never widened
    assert code == 0 and "user/went-public: a private dataset repo (it was private: --public does not change" in err
    assert api.dataset_info("user/went-public").private is True


def test_push_publishes_only_the_bundle_contract(bundle_dir, tmp_path, capsys, caplog, monkeypatch, hf_cache, hub):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / ".env").write_text(f"HF_TOKEN={USER_TOKEN}\n")
    (copy / "notes").mkdir()
    (copy / "notes" / "secret.txt").write_text("patient list")
    (copy / "slide-042.svs").write_bytes(b"II*\x00 a slide")
    shutil.copy(copy / "data" / "train-00000.tar", copy / "data" / "train-00099.tar")  # real patches, say
    (copy / "assets" / "linked.png").symlink_to("/etc/hostname")
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    code, _, err = run_cli(["push", str(copy), "user/allow-list"], capsys)
    assert code == 0, err
    files = set(HfApi(token=USER_TOKEN).list_repo_files("user/allow-list", repo_type="dataset"))
    assert files == {".gitattributes", "README.md", "manifest.json", "id2label.json", "data/train-00000.tar",
                     "data/train-00001.tar", "assets/sample_grid.png", "assets/heterogeneity.png"}
    warning = [r.getMessage() for r in caplog.records if "left out of the push" in r.getMessage()]
    assert len(warning) == 1
    for name in (".env", "notes/secret.txt", "slide-042.svs", "data/train-00099.tar", "assets/linked.png (symlink)"):
        assert name in warning[0]
    rows = load_dataset("user/allow-list", split="train", token=USER_TOKEN, cache_dir=str(hf_cache))
    assert len(rows) == 6
    assert json.loads((copy / ".work" / "published.json").read_text()) == {"dataset": "user/allow-list"}
    assert "published_as" not in json.loads((copy / "manifest.json").read_text())

    # the bundle shrinks to one shard: the push mirrors it, the stale shard leaves the repo
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"], manifest["splits"]["train"] = manifest["shards"][:1], 4
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli(["push", str(copy), "user/allow-list"], capsys)[0] == 0
    assert "data/train-00001.tar" not in HfApi(token=USER_TOKEN).list_repo_files("user/allow-list", repo_type="dataset")


def test_a_failed_push_records_no_publication(bundle_dir, tmp_path, capsys, monkeypatch, hub):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    monkeypatch.setattr("htd_toolkit.publish.hub.time.sleep", lambda s: None)
    hub.state.fail_next("commit", count=10, status=503)
    code, _, err = run_cli(["push", str(copy), "user/never"], capsys)
    hub.state.faults["commit"] = []
    assert code == 1 and "push to user/never failed: HTTP 503" in err
    assert not (copy / ".work" / "published.json").exists()


def test_generate_pushes_bundle_and_model_with_linked_cards(model_dir, prepared, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    code, _, err = run_cli(gen_args(model, prepared, tmp_path / "b", 4, "--push-to-hub", "user/linked", "--with-model"),
                           capsys)
    assert code == 0, err
    api = HfApi(token=USER_TOKEN)
    assert api.model_info("user/linked-model").private is True
    model_files = set(api.list_repo_files("user/linked-model"))
    assert {"htd_config.json", "controlnet/config.json", "pytorch_lora_weights.safetensors"} <= model_files
    assert not any(f.startswith(("checkpoint-", "logs/", "validation/")) for f in model_files)
    from huggingface_hub import ModelCard, hf_hub_download

    model_card = ModelCard.load(hf_hub_download("user/linked-model", "README.md", token=USER_TOKEN,
                                                cache_dir=tmp_path / "c"))
    assert not model_card.data.datasets or "user/linked" not in model_card.data.datasets  # training data only
    assert 'HTDPipeline.from_pretrained("user/linked-model")' in model_card.text
    assert "## Synthetic datasets made with this model\n- [user/linked](https://huggingface.co/datasets/user/linked)" \
        in model_card.text
    dataset_card = DatasetCard.load(hf_hub_download("user/linked", "README.md", repo_type="dataset", token=USER_TOKEN,
                                                    cache_dir=tmp_path / "c"))
    assert "https://huggingface.co/user/linked-model" in dataset_card.text


def test_transient_server_errors_are_retried(bundle_dir, tmp_path, capsys, monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    monkeypatch.setattr("htd_toolkit.publish.hub.time.sleep", lambda s: None)
    before = sum(1 for method, path in hub.state.request_log if path.endswith("/commit/main"))
    hub.state.fail_next("commit", count=2, status=503)
    code, _, err = run_cli(["push", str(bundle_dir), "user/flaky"], capsys)
    assert code == 0, err
    assert hub.state.faults["commit"] == []  # both failures were served, then the commit went through
    assert sum(1 for method, path in hub.state.request_log if path.endswith("/commit/main")) - before == 3
    assert "data/train-00001.tar" in HfApi(token=USER_TOKEN).list_repo_files("user/flaky", repo_type="dataset")


@pytest.mark.parametrize("case, message", [
    ("invalid repo", "invalid repo id"),
    ("missing token", "not logged in or invalid token"),
    ("read-only token", "no write access"),
])
def test_push_errors_are_one_line_and_publish_nothing(bundle_dir, capsys, monkeypatch, case, message):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    repo = {"invalid repo": "user/bad..name", "missing token": "user/notoken", "read-only token": "user/ro-push"}[case]
    if case == "read-only token":
        monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    code, _, err = run_cli(["push", str(bundle_dir), repo], capsys)
    assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err
    if case != "invalid repo":
        assert not HfApi(token=USER_TOKEN).repo_exists(repo, repo_type="dataset")  # nothing was published


def test_a_prepared_folder_serves_as_its_own_crop_bank(prepared):
    from htd_toolkit.data.sources import CropBank

    bank = CropBank(prepared)
    assert bank.folder == Path(prepared) / "crop_bank"
    assert {c: len(v) for c, v in bank.by_class.items()} == {c: len(v) for c, v in
                                                             CropBank(bank.folder).by_class.items()}
    assert set(bank.by_class) == {1, 2}


@pytest.mark.parametrize("case", ["no config", "classes differ", "empty bank class", "empty bank", "bad crop sample",
                                  "unwritable", "foreign out"])
def test_generate_bad_input(model_dir, prepared, tmp_path, capsys, case):
    model, maps, bank, out = Path(model_dir), Path(prepared), Path(prepared) / "crop_bank", tmp_path / "out"
    if case in ("empty bank class", "empty bank", "bad crop sample"):
        bank = tmp_path / "bank"
        bank.mkdir()
    if case == "no config":
        model = tmp_path / "not-a-model"
        model.mkdir()
        expected = "not an HTD model folder (no htd_config.json)"
    elif case == "classes differ":
        maps = tmp_path / "maps"
        shutil.copytree(prepared, maps)
        manifest = json.loads((maps / "manifest.json").read_text())
        manifest["classes"][2]["name"] = "carcinoma"
        manifest.pop("class_fingerprint")  # a folder from before fingerprints: its class names are compared
        (maps / "manifest.json").write_text(json.dumps(manifest))
        expected = "differ from the model's"
    elif case == "empty bank class":
        shutil.copy(prepared / "crop_bank" / "c001-00000.tar", bank)
        expected = "has no crop of class 2 (tumor)"
    elif case == "empty bank":
        expected = "no crop-bank shards (c*.tar) here"
    elif case == "bad crop sample":
        import webdataset as wds

        from tests.helpers import png_bytes

        with wds.TarWriter(str(bank / "c001-00000.tar")) as sink:
            sink.write({"__key__": "k", "png": png_bytes(np.zeros((8, 8, 3), np.uint8)), "json": {"box": [0, 0, 8]}})
        expected = "c001-00000.tar (k): not a crop-bank sample"
    elif case == "foreign out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "holds files generate did not write (notes.txt)"
    else:  # a path below a regular file: unwritable even for root, who ignores permission bits
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        expected = "cannot write there"
    args = ["generate", "--model", str(model), "--maps", str(maps), "--crop-bank", str(bank), "--num-samples", "2",
            "--out", str(out), "--steps", "2"]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and expected in err and "Traceback" not in err, err
    assert not (out / "data").exists()


def test_demo_runs_offline_end_to_end_and_pushes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    code, out, err = run_cli(["demo", "--out", str(tmp_path / "demo"), "--push-to-hub", "user/demo"], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "demo" / "bundle")
    assert "16 rows" in err and "toy H&E base" in err
    for card in (tmp_path / "demo" / "bundle" / "README.md", tmp_path / "demo" / "model" / "README.md"):
        assert "toy H&E base" in card.read_text() and "not a realistic generator" in card.read_text()
        assert "CMU-1-Small-Region" in card.read_text() and "camelyon16" not in card.read_text()  # the data's name
    api = HfApi(token=USER_TOKEN)
    assert api.dataset_info("user/demo").private and api.model_info("user/demo-model").private
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((tmp_path / "demo" / "model" / "logs" / "htd").glob("events.out.tfevents.*"))
    logged = EventAccumulator(str(events.parent))
    logged.Reload()
    assert {"loss", "lr"} <= set(logged.Tags()["scalars"]) and logged.Tags()["images"]
    from htd_toolkit.evaluate.sets import load_set

    generated = load_set(tmp_path / "demo" / "bundle", "train").images.reshape(-1, 3).mean(0) / 255
    real = load_set(tmp_path / "demo" / "prepared", "train").images.reshape(-1, 3).mean(0) / 255
    # issue 12's target: H&E in colour, within 0.08 of the real patches per channel, green the lowest
    assert np.abs(generated - real).max() < 0.08 and generated.argmin() == 1, (generated, real)


def test_model_from_the_hub_at_a_revision_generates(model_dir, prepared, tmp_path, monkeypatch):
    from htd_toolkit.models.conditioning import Conditioning
    from htd_toolkit.models.pipeline import HTDPipeline
    from htd_toolkit.publish.hub import push_model

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    push_model(model_dir, "user/hub-model")
    api = HfApi(token=USER_TOKEN)
    first = api.model_info("user/hub-model").sha
    api.upload_file(path_or_fileobj=b"later\n", path_in_repo="NOTES.md", repo_id="user/hub-model")
    assert api.model_info("user/hub-model").sha != first
    pipe = HTDPipeline.from_pretrained("user/hub-model", revision=first)
    local = HTDPipeline.from_pretrained(model_dir)
    from htd_toolkit.models.training_data import TrainingStream

    item = next(iter(TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False)))
    cond = Conditioning.stack([item["conditioning"]])
    assert np.array_equal(*(p(conditioning=cond, generator=p.seeded([5]), num_inference_steps=2, output_type="np").images
                            for p in (pipe, local)))


def test_two_processes_write_their_own_shards_and_one_manifest(model_dir, prepared, bundle_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    launcher = Path(sys.executable).with_name("accelerate")
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_two_process.yaml"
    cmd = [str(launcher), "launch", "--config_file", str(config), "-m", "htd_toolkit.cli",
           *gen_args(model_dir, prepared, out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    from htd_toolkit.data.shards import read_tar
    from htd_toolkit.generate.bundle import read_throughput

    # two processes ran, and each wrote its own shard only
    assert [(t.process, t.processes, t.shards) for t in (read_throughput(out, 0), read_throughput(out, 1))] == \
        [(0, 2, [0]), (1, 2, [1])]

    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["path"] for s in manifest["shards"]] == ["data/train-00000.tar", "data/train-00001.tar"]
    for shard in manifest["shards"]:
        ours, reference = list(read_tar(out / shard["path"])), list(read_tar(bundle_dir / shard["path"]))
        assert [k for k, _ in ours] == [k for k, _ in reference]
        for (_, a), (_, b) in zip(ours, reference, strict=True):
            a, b = dict(a), dict(b)
            assert a["json"] == b["json"] and a["mask.png"] == b["mask.png"]
            # one torch thread per process here: float sums may round differently, pixels stay within 1-2 levels
            from tests.test_prepare_annotated import decode

            assert np.abs(decode(a, "png").astype(int) - decode(b, "png").astype(int)).max() <= 2


def test_demo_takes_the_unannotated_path(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--out", str(tmp_path / "demo"), "--unannotated"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "demo" / "prepared" / "manifest.json").read_text())
    assert manifest["source"] == {"name": "CMU-1-Small-Region", "license": "cc0-1.0", "format": "pseudo"}
    assert len(manifest["classes"]) == 4
    assert "16 rows" in err and (tmp_path / "demo" / "prepared" / "assets" / "cluster_gallery.png").exists()


@pytest.mark.slow  # torch.compile takes minutes on 2 CPU cores (one thread each under xdist)
@pytest.mark.timeout(900)
def test_compiled_generation_matches_eager(model_dir, prepared, bundle_dir, tmp_path, capsys):
    code, _, err = run_cli(gen_args(model_dir, prepared, tmp_path / "compiled", 6, "--compile"), capsys)
    assert code == 0, err
    same_samples(tmp_path / "compiled", bundle_dir)  # fused kernels round differently: not bit for bit


def test_compiled_kernels_are_kept_in_the_toolkit_cache(tmp_path, monkeypatch):
    from htd_toolkit.config import keep_compiled_kernels

    monkeypatch.setenv("HTD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert keep_compiled_kernels() == tmp_path / "cache" / "torchinductor"
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()) == tmp_path / "cache" / "torchinductor"  # what inductor will use
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert keep_compiled_kernels() == tmp_path / "mine"  # the user's choice wins


@pytest.mark.parametrize("licence, expected", [
    ("cc-by-4.0", {"license": "cc-by-4.0"}),
    (None, {"license": "other", "license_name": "unknown", "license_link": "README.md#source-data-and-licence"}),
    ("CC BY-NC-ND 3.0 IGO", {"license": "other", "license_name": "cc-by-nc-nd-3.0-igo",
                             "license_link": "README.md#source-data-and-licence"}),
])
def test_an_unknown_licence_is_other_with_a_name_and_a_link(bundle_dir, licence, expected):
    from htd_toolkit.publish.cards import dataset_card

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["source"]["license"] = licence
    card = dataset_card(manifest)
    card.validate(repo_type="dataset")
    data = card.data.to_dict()
    assert {k: data.get(k) for k in expected} == expected
    assert "## Source data and licence" in card.text


def test_the_pipeline_called_as_diffusers_pipelines_are_gives_generates_pixels(model_dir, prepared, bundle_dir):
    """`pipe(semantic_map=..., crops=..., generator=...)` on a bundle sample's map, crops and seed returns the
    bundle's image; the output carries the map as its mask; every output type; bad inputs are one line."""
    import torch
    from PIL import Image

    from htd_toolkit.data.shards import read_tar
    from htd_toolkit.models.pipeline import HTDPipeline, HTDPipelineOutput
    from tests.test_prepare_annotated import decode

    bank = {key: dict(m) for path in sorted((prepared / "crop_bank").glob("*.tar")) for key, m in read_tar(path)}
    key, members = next(iter(read_tar(bundle_dir / "data" / "train-00000.tar")))
    members = dict(members)
    meta, mask = json.loads(members["json"]), decode(members, "mask.png")
    crops = {c["class"]: decode(bank[c["key"]], "png") for c in meta["crops"]}
    pipe = HTDPipeline.from_pretrained(model_dir)
    out = pipe(semantic_map=mask, crops=crops, num_inference_steps=3, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(meta["seed"]), output_type="np")
    assert isinstance(out, HTDPipelineOutput) and np.array_equal(out.masks[0], mask)
    assert np.abs(out.images[0].astype(int) - decode(members, "png").astype(int)).max() <= 2, key  # batch of 4 there
    pil = pipe(semantic_map=Image.fromarray(mask), crops=[crops], num_inference_steps=3,
               generator=pipe.seeded([meta["seed"]])).images
    assert isinstance(pil[0], Image.Image) and np.array_equal(np.asarray(pil[0]), out.images[0])
    tensor, masks = pipe(semantic_map=torch.from_numpy(np.stack([mask, mask])), crops=[crops, crops],
                         num_inference_steps=3, generator=pipe.seeded([meta["seed"], 7]), output_type="pt",
                         return_dict=False)
    assert tensor.shape == (2, 3, *mask.shape) and masks.shape == (2, *mask.shape)
    # the same sample in a batch of two: float reduction order may move a pixel by one grey level, no more
    diff = ((tensor[0] * 255).round().byte().permute(1, 2, 0).int() - torch.from_numpy(out.images[0]).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())
    bad = mask.copy()
    bad[0, 0] = 9
    for kwargs, message in [({"semantic_map": bad, "crops": crops}, "class id 9 is not one of the model's 3"),
                            ({"semantic_map": mask}, "no crop for class"),
                            ({"semantic_map": mask[:60, :60], "crops": crops}, "not a multiple of the VAE factor"),
                            ({"semantic_map": mask, "crops": crops, "output_type": "jpeg"}, "output_type"),
                            ({"semantic_map": [mask, mask], "crops": [crops]}, "1 crop dicts for 2 maps"),
                            ({"semantic_map": mask, "crops": crops, "generator": pipe.seeded([1, 2])},
                             "2 generators for 1 maps")]:
        with pytest.raises(ValueError, match=message):
            pipe(num_inference_steps=1, **kwargs)


def test_a_stochastic_scheduler_draws_its_step_noise_from_the_sample_generators():
    """DDPM adds noise at every step: from each sample's own generator, so a seed gives the same image twice
    and the same image alone as in a batch (up to a grey level of floating-point rounding)."""
    from htd_toolkit.base.shipped import shipped_adapter_model
    from htd_toolkit.models.pipeline import HTDPipeline
    from htd_toolkit.testing.slides import FIDELITY_FIXTURE

    with np.load(FIDELITY_FIXTURE) as data:
        maps = list(data["maps"][:2])
        crops = [{int(c): data["crops"][i, j] for j, c in enumerate(data["crop_classes"][i]) if c} for i in range(2)]
    pipe = HTDPipeline.from_pretrained(shipped_adapter_model(), scheduler="ddpm")
    twice = [pipe(semantic_map=maps, crops=crops, num_inference_steps=4, output_type="np",
                  generator=pipe.seeded([0, 1])).images for _ in range(2)]
    alone = pipe(semantic_map=maps[1:], crops=crops[1:], num_inference_steps=4, output_type="np",
                 generator=pipe.seeded([1])).images
    assert np.array_equal(twice[0], twice[1])
    assert np.abs(alone[0].astype(int) - twice[0][1]).max() <= 2


def test_other_maps_under_the_same_path_are_not_continued_into_a_bundle(model_dir, prepared, tmp_path, capsys):
    maps = tmp_path / "maps"
    shutil.copytree(prepared, maps)
    out = tmp_path / "bundle"
    assert run_cli(gen_args(model_dir, maps, out, 2), capsys)[0] == 0
    shutil.rmtree(maps)
    shutil.copytree(prepared, maps)
    manifest = json.loads((maps / "manifest.json").read_text())
    validation = [s for s in manifest["shards"] if s.get("split") == "validation"]
    manifest["shards"] = validation + [{**s, "split": "train"} for s in validation]  # other maps: the validation ones
    (maps / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(gen_args(model_dir, maps, out, 2), capsys)
    assert code == 1 and "other options" in err and "maps_sha256" in err


def test_a_model_retrained_in_place_or_another_crop_bank_is_not_continued_into_a_bundle(model_dir, prepared, tmp_path,
                                                                                           capsys):
    """A local model is named by its folder's name, which says nothing of what it holds: a bundle is continued
    only with the same model files and the same crop bank, or it would hold two models' images."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "validation"))
    bank = tmp_path / "bank"
    shutil.copytree(prepared / "crop_bank", bank)
    out = tmp_path / "bundle"
    args = gen_args(model, prepared, out, 2)
    args[args.index("--crop-bank") + 1] = str(bank)
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(args, capsys)[0] == 0  # the same files: nothing to do
    lora = load_file(model / "pytorch_lora_weights.safetensors")
    save_file({k: v + 1e-3 for k, v in lora.items()}, model / "pytorch_lora_weights.safetensors")  # retrained
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "other options" in err and "model_sha256" in err
    shutil.rmtree(model)
    shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "validation"))
    assert run_cli(args, capsys)[0] == 0  # the model it was made with again
    shards = sorted(bank.glob("c*.tar"))
    shutil.copy(shards[0], shards[0].with_name("c001-00001.tar"))  # a bank with more crops
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "other options" in err and "crop_bank_sha256" in err


def test_a_run_stopped_by_a_mistyped_crop_bank_does_not_block_the_corrected_one(model_dir, prepared, tmp_path, capsys):
    """The crop bank names the bundle (its digest is in the options): a run that stops on a wrong --crop-bank
    gives back the folder it claimed, so the run with the right one is not refused as 'other options'."""
    out = tmp_path / "bundle"
    args = gen_args(model_dir, prepared, out, 2)
    args[args.index("--crop-bank") + 1] = str(tmp_path / "no-such-bank")
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "crop bank folder not found" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # it was missing
    out.mkdir()
    assert run_cli(args, capsys)[0] == 1 and list(out.iterdir()) == []  # it was empty: it is again
    assert run_cli(gen_args(model_dir, prepared, out, 2), capsys)[0] == 0


def test_model_sha256_reads_the_model_files_behind_a_symlinked_subfolder(tmp_path):
    """A model folder whose controlnet/ is a link to the real one is the same model, and an edit behind the
    link is another; checkpoint-* files are not the model's."""
    from htd_toolkit.base.shipped import shipped_adapter_model
    from htd_toolkit.models.folder import model_sha256

    model, linked, real = tmp_path / "model", tmp_path / "linked", tmp_path / "controlnet"
    shutil.copytree(shipped_adapter_model(), model)
    shutil.copytree(model, linked, ignore=shutil.ignore_patterns("controlnet"))
    shutil.copytree(model / "controlnet", real)
    (linked / "controlnet").symlink_to(real)
    (linked / "checkpoint-2").mkdir()
    (linked / "checkpoint-2" / "htd_config.json").write_text("{}")
    assert model_sha256(linked) == model_sha256(model)
    (real / "config.json").write_text((real / "config.json").read_text() + "\n")
    assert model_sha256(linked) != model_sha256(model)


def test_another_base_model_is_not_continued_into_a_bundle(model_dir, prepared, tiny_base_sd15, tmp_path, capsys):
    """--base-model puts the model's weights on another base, which makes other images: a bundle made on the
    recorded base is not returned as made, nor continued, under another."""
    out = tmp_path / "bundle"
    assert run_cli(gen_args(model_dir, prepared, out, 2), capsys)[0] == 0
    code, _, err = run_cli(gen_args(model_dir, prepared, out, 2, "--base-model", str(tiny_base_sd15)), capsys)
    assert code == 1 and "other options" in err and "base_model" in err
