"""Stable Diffusion 1.5's real shapes end to end on the CPU (issue 30, item 5): random weights in SD1.5's UNet
and VAE configuration (4-channel latents at 64 x 64, scaling_factor 0.18215, 77 x 768 text states,
cross-attention at 64/32/16/8 with the crop tokens' region masks at each), every branch on (LoRA, ControlNet,
crop adapter), 512 x 512 patches, batch 1, fp32, gradient checkpointing.

Two training steps with a checkpoint after each, a run resumed from checkpoint-1 that must end with the same
weights, one `generate` image at 2 steps and one `generate-slide` window. Each stage runs in its own process,
whose wall time and peak RSS (wait4's ru_maxrss) are printed and written to $HTD_REHEARSAL_FIGURES when set;
docs/performance.md holds the figures of a run. Not a substitute for the GPU suite: it catches shape and
scaling bugs before a GPU is lent.
"""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.test_benchmarks import load
from tests.test_training import RECIPE, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
CLI = [sys.executable, "-m", "htd_toolkit.cli"]


def record(figures: dict) -> None:
    """Print the figures so far and write them to $HTD_REHEARSAL_FIGURES (after every stage: a run stopped
    half-way keeps what it measured)."""
    print(json.dumps(figures, indent=1))
    if os.environ.get("HTD_REHEARSAL_FIGURES"):
        Path(os.environ["HTD_REHEARSAL_FIGURES"]).write_text(json.dumps(figures, indent=1) + "\n")


def run_measured(cmd: list[str], log: Path, figures: dict, stage: str) -> None:
    """Run `cmd` to the end; record its wall time and peak resident memory (its own, from wait4) as `stage`."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, log.read_text()[-4000:]
    figures[stage] = {"seconds": round(time.monotonic() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    record(figures)


def recipe_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(RECIPE), "--pretrained_model_name_or_path", str(base), "--train_data_dir",
            str(data), "--output_dir", str(out), "--resolution", "512", "--train_batch_size", "1",
            "--max_train_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
            "--crop_mode", "adapter", "--crop_size", "64", "--max_crops", "3", "--embed_dim", "256",
            "--lora_rank", "16", "--lora_alpha", "16", "--mixed_precision", "no", "--gradient_checkpointing",
            "--validation_steps", "0",
            "--dataloader_num_workers", "0", "--shuffle_buffer", "4", "--report_to", "none", "--logging_steps", "1",
            *extra]


TRAINED = ("controlnet/diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors",
           "crop_adapter/ip_adapter.safetensors", "crop_adapter/crop_encoder/diffusion_pytorch_model.safetensors")


def test_sd15_shapes_train_resume_generate_and_tile_on_the_cpu(tmp_path):
    from htd_toolkit.models.htd_model import HTDConfig

    bench = load("generate")
    figures = {}
    start = time.monotonic()
    base = bench.write_base(tmp_path / "base", bench.SHAPES["sd15"])
    data = bench.prepare_maps(tmp_path / "prep", bench.SHAPES["sd15"])
    figures["fixtures (SD1.5 random base, 512-px patches of the CC0 slide)"] = {
        "seconds": round(time.monotonic() - start, 1)}
    record(figures)
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    assert unet_config["block_out_channels"] == [320, 640, 1280, 1280] and unet_config["cross_attention_dim"] == 768
    assert json.loads((base / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_measured(recipe_args(base, data, full), tmp_path / "train.log", figures,
                 "train: 2 steps, a checkpoint after each, final save")
    assert "loss" in (tmp_path / "train.log").read_text()
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    config = HTDConfig.load(full)
    assert (config.resolution, config.crop_mode, config.lora_rank) == (512, "adapter", 16)
    resumed.mkdir()
    os.symlink(full / "checkpoint-1", resumed / "checkpoint-1")  # the resumed run reads it, writes checkpoint-2
    run_measured(recipe_args(base, data, resumed, "--resume_from_checkpoint", "latest"), tmp_path / "resume.log",
                 figures, "train: resumed from checkpoint-1, 1 step, final save")
    for name in TRAINED:
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    first = load_file(full / "checkpoint-1" / "trainable.safetensors")
    last = load_file(full / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in last.values())
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the second step moved the weights

    bundle = tmp_path / "bundle"
    run_measured(
        [*CLI, "generate", "--model", str(full), "--base-model", str(base), "--maps", str(data), "--crop-bank",
         str(data / "crop_bank"), "--num-samples", "1", "--batch-size", "1", "--steps", "2", "--out", str(bundle)],
        tmp_path / "generate.log", figures, "generate: 1 image at 2 steps")
    with tarfile.open(next((bundle / "data").glob("*.tar"))) as shard:
        image = next(m for m in shard.getmembers() if m.name.endswith((".png", ".jpg", ".webp")) and "mask" not in m.name)
        assert Image.open(shard.extractfile(image)).size == (512, 512)

    Image.fromarray(first_training_mask(data)).save(tmp_path / "map.png")  # 512 px at the model's mpp: one window
    slide = tmp_path / "slide.tif"
    run_measured(
        [*CLI, "generate-slide", "--model", str(full), "--base-model", str(base), "--map", str(tmp_path / "map.png"),
         "--crop-bank", str(data / "crop_bank"), "--tile", "512", "--steps", "2", "--out", str(slide)],
        tmp_path / "slide.log", figures, "generate-slide: one 512-px window at 2 steps")
    import tiffslide

    with tiffslide.TiffSlide(slide) as made:
        assert made.dimensions == (512, 512)


def first_training_mask(data: Path) -> np.ndarray:
    from htd_toolkit.models.training_data import TrainingStream

    item = next(iter(TrainingStream(data, 512, 3, 64, "none", shuffle_buffer=1, augment=False)))
    return item["conditioning"].class_map.numpy().astype(np.uint8)
