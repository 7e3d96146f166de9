"""The recipe's diffusers-named flags (issue 30 item 3) and the LoRA's key format, on the tiny base, on CPU."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from htd_toolkit.models.htd_model import HTDModel
from htd_toolkit.models.training_data import TrainingStream
from tests.test_training import RECIPE, demo_args, perturb_lora_b, recipe, tiny_config, train

QUICK = ("--checkpointing_steps", "0", "--validation_steps", "0")


def test_every_option_is_declared_once_with_help_and_the_new_flags_parse_from_the_command_line_and_yaml(tmp_path):
    assert set(recipe.DEFAULTS) == set(recipe.HELP) == set(recipe.OPTIONS)
    parsed = recipe.parse_args([
        "--controlnet_model_name_or_path", "org/cn", "--max_train_samples", "5", "--cache_dir", "/c",
        "--variant", "fp16", "--revision", "r1", "--use_8bit_adam", "--no-set_grads_to_none",
        "--validation_image", "a.png", "b.png", "--lr_num_cycles", "3", "--lr_power", "2.5",
        "--enable_xformers_memory_efficient_attention"])
    assert (parsed.controlnet_model_name_or_path, parsed.max_train_samples, parsed.cache_dir, parsed.variant,
            parsed.revision, parsed.use_8bit_adam, parsed.set_grads_to_none, parsed.validation_image,
            parsed.lr_num_cycles, parsed.lr_power, parsed.enable_xformers_memory_efficient_attention) == \
        ("org/cn", 5, "/c", "fp16", "r1", True, False, ["a.png", "b.png"], 3, 2.5, True)
    defaults = recipe.parse_args([])
    assert defaults.set_grads_to_none is True and defaults.lr_num_cycles == 1 and defaults.lr_power == 1.0
    config = tmp_path / "c.yaml"
    config.write_text("validation_image: one.png\nmax_train_samples: 7\n")
    from_yaml = recipe.parse_args(["--config", str(config)])
    assert from_yaml.validation_image == ["one.png"] and from_yaml.max_train_samples == 7
    usage = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True).stdout
    assert all(f"--{name}" in usage for name in recipe.OPTIONS)


@pytest.mark.parametrize("flag, value", [("--max_train_samples", "0"), ("--lr_num_cycles", "0"),
                                         ("--lr_power", "0"), ("--lr_power", "nan")])
def test_new_numeric_flags_are_bounded(prepared, tiny_base_sd15, tmp_path, capsys, flag, value):
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "m", flag, value)) == 1
    err = capsys.readouterr().err
    assert f"{flag} {value}" in err and err.count("\n") == 1


@pytest.mark.parametrize("flag, package", [("--use_8bit_adam", "bitsandbytes"),
                                           ("--enable_xformers_memory_efficient_attention", "xformers")])
def test_memory_savers_without_their_package_are_refused_in_one_line(prepared, tiny_base_sd15, tmp_path, capsys,
                                                                     monkeypatch, flag, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "m", flag)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag}") and f"{package}" in err
    assert "not installed" in err and not (tmp_path / "m").exists()


def test_xformers_with_xformers_installed_is_refused_saying_sdpa_is_used(prepared, tiny_base_sd15, tmp_path, capsys,
                                                                         monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real("torch") if name == "xformers" else real(name, *a))
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "m", "--enable_xformers_memory_efficient_attention")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SDPA" in err and "not installed" not in err


def saved_controlnet(prepared, tiny_base_sd15, folder: Path, channels: int) -> Path:
    """A ControlNet of the tiny base's shape with random weights (not a copy of the UNet), saved to `folder`."""
    from diffusers import UNet2DConditionModel

    from htd_toolkit.testing.tiny_base import tiny_controlnet

    controlnet = tiny_controlnet(UNet2DConditionModel.from_pretrained(tiny_base_sd15, subfolder="unet"), channels)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    controlnet.save_pretrained(folder)
    return folder


def test_controlnet_model_name_or_path_starts_from_that_controlnet(prepared, tiny_base_sd15, tmp_path, capsys):
    start = saved_controlnet(prepared, tiny_base_sd15, tmp_path / "cn", channels=3)
    out = tmp_path / "m"
    assert train(demo_args(tiny_base_sd15, prepared, out, *QUICK, "--max_train_steps", "1",
                           "--controlnet_model_name_or_path", str(start), "--learning_rate", "1e-6")) == 0
    given, trained = load_file(start / "diffusion_pytorch_model.safetensors"), \
        load_file(out / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert given.keys() == trained.keys()
    moved = max(float((given[k] - trained[k]).abs().max()) for k in given)
    assert 0 < moved < 1e-5  # one Adam step of 1e-6 from the given weights: it trained, starting there
    fresh = tmp_path / "fresh"
    assert train(demo_args(tiny_base_sd15, prepared, fresh, *QUICK, "--max_train_steps", "1", "--learning_rate",
                           "1e-6")) == 0
    copied = load_file(fresh / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert max(float((given[k] - copied[k]).abs().max()) for k in given) > 0.01  # not what training from the UNet gives

    wrong = saved_controlnet(prepared, tiny_base_sd15, tmp_path / "cn3", channels=5)
    capsys.readouterr()
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "w", "--controlnet_model_name_or_path", str(wrong))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--controlnet_model_name_or_path {wrong}: conditioning_channels 5" in err
    assert "need 3" in err and not (tmp_path / "w").exists()
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "w", "--controlnet_model_name_or_path",
                           str(tmp_path / "nothing"))) == 1
    assert "no ControlNet there" in capsys.readouterr().err


def keys_of(prepared, **kwargs) -> list[str]:
    stream = TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=4, **kwargs)
    return [item["__key__"] for item in stream]


def test_max_train_samples_keeps_a_seeded_subset_the_same_every_epoch(prepared, tiny_base_sd15, tmp_path):
    everything = set(keys_of(prepared))
    stream = TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=4, max_samples=5)
    epochs = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        epochs.append([item["__key__"] for item in stream])
    assert len(stream) == 5 and all(len(keys) == len(set(keys)) == 5 for keys in epochs)
    assert set(epochs[0]) == set(epochs[1]) < everything and epochs[0] != epochs[1]  # reshuffled, same subset
    assert set(keys_of(prepared, max_samples=5, seed=1)) != set(epochs[0])  # another seed, another subset
    assert set(keys_of(prepared, max_samples=10 ** 6)) == everything
    out = tmp_path / "few"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_samples", "4", "--num_train_epochs", "1",
                           "--train_batch_size", "2", "--checkpointing_steps", "0", "--validation_steps", "1000")) == 0
    assert [p.name for p in (out / "validation").iterdir()] == ["step-000002.png"]  # 4 samples: 2 steps of 2


def test_validation_image_validates_on_the_given_maps(prepared, tiny_base_sd15, tmp_path, capsys):
    item = next(iter(TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False)))
    labels = item["conditioning"].class_map.numpy().astype(np.uint8)
    assert len(np.unique(labels)) >= 2
    maps = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.fromarray(labels).save(maps[0])
    Image.fromarray(np.kron(labels[::-1], np.ones((2, 2), np.uint8))).save(maps[1])  # 128 px: resized to 64
    out = tmp_path / "m"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "1", "--checkpointing_steps", "0",
                           "--validation_steps", "1", "--num_validation_images", "4",
                           "--validation_image", *map(str, maps))) == 0
    grid = np.asarray(Image.open(out / "validation" / "step-000001.png"))
    assert grid.shape[0] == 2 * 64  # one row per given map, not --num_validation_images
    from htd_toolkit.publish.figures import colorize

    assert grid[:64, :64].tolist() == colorize(labels, recipe_specs(out)).tolist()  # the map shown is the given one
    assert (grid[:, -64:] == 255).all()  # no real image beside a given map
    bad = tmp_path / "bad.png"
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(bad)
    capsys.readouterr()
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "x", "--validation_image", str(bad))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--validation_image {bad}" in err and not (tmp_path / "x").exists()


def recipe_specs(out: Path):
    from htd_toolkit.annotations.base import ClassSpec

    return [ClassSpec(c["index"], c["name"], c["color"]) for c in json.loads((out / "htd_config.json").read_text())["classes"]]


@pytest.mark.parametrize("schedule, extra", [("cosine_with_restarts", ("--lr_num_cycles", "3")),
                                             ("polynomial", ("--lr_power", "3.0"))])
def test_lr_num_cycles_and_lr_power_shape_the_schedule_as_diffusers(prepared, tiny_base_sd15, tmp_path, schedule,
                                                                       extra):
    from diffusers.optimization import get_scheduler

    out = tmp_path / "m"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                           "--validation_steps", "0", "--lr_scheduler", schedule, "--lr_warmup_steps", "1", *extra)) == 0
    state = torch.load(out / "checkpoint-2" / "scheduler.bin", weights_only=False)

    def lr_after(steps: int, **options) -> float:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=1, num_training_steps=4, **options)
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
        return scheduler.get_last_lr()[0]

    name, kind = {"--lr_num_cycles": ("num_cycles", int), "--lr_power": ("power", float)}[extra[0]]
    expected = lr_after(2, **{name: kind(extra[1])})
    assert state["_last_lr"][0] == pytest.approx(expected, rel=1e-6) and abs(expected - lr_after(2)) > 1e-5


def test_lora_is_saved_with_current_diffusers_key_names_and_legacy_folders_still_load(prepared, tiny_base_sd15,
                                                                                       tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from htd_toolkit.models.conditioning import Conditioning

    config = tiny_config(prepared)
    model = HTDModel.from_base(config, tiny_base_sd15)
    perturb_lora_b(model)
    out = model.save_pretrained(tmp_path / "m", embed_base=tiny_base_sd15)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(re.fullmatch(r"unet\..+\.lora_[AB]\.weight", key) for key in saved), sorted(saved)[:3]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_sd15, safety_checker=None)
    pipe.load_lora_weights(out)  # the stock loader
    loaded = dict(pipe.unet.named_parameters())
    assert all(torch.equal(value, loaded[key.removeprefix("unet.").replace(".weight", ".default_0.weight")])
               for key, value in saved.items())
    legacy = tmp_path / "legacy"
    import shutil

    shutil.copytree(out, legacy)
    old_keys = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(
        {k.removeprefix("unet."): v for k, v in saved.items()}).items()}
    assert all(".lora.down." in k or ".lora.up." in k for k in old_keys)
    from safetensors import safe_open

    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as handle:
        metadata = handle.metadata()
    save_file(old_keys, legacy / "pytorch_lora_weights.safetensors", metadata=metadata)
    item = next(iter(TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False)))
    cond = Conditioning.stack([item["conditioning"]])
    noisy, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(HTDModel.from_pretrained(out)(noisy, t, cond), HTDModel.from_pretrained(legacy)(noisy, t, cond))


def test_set_grads_to_none_is_passed_to_the_optimizer(prepared, tiny_base_sd15, tmp_path, monkeypatch):
    seen = []
    real = torch.optim.AdamW.zero_grad

    def record(self, set_to_none=True):
        seen.append(set_to_none)
        return real(self, set_to_none)

    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", record)
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "a", *QUICK, "--max_train_steps", "1")) == 0
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "b", *QUICK, "--max_train_steps", "1",
                           "--no-set_grads_to_none")) == 0
    assert True in seen and seen[-1] is False

