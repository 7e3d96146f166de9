"""The HTD model and the accelerate recipe on the tiny base, on CPU."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from htd_toolkit.errors import UserError
from htd_toolkit.models import CROP_MODES
from htd_toolkit.models.conditioning import Conditioning
from htd_toolkit.models.htd_model import HTDConfig, HTDModel
from htd_toolkit.models.pipeline import HTDPipeline
from htd_toolkit.models.training import training_loss
from htd_toolkit.models.training_data import TrainingStream, collate_samples
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_controlnet.py"
DEMO = ROOT / "recipes" / "configs" / "demo.yaml"


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_controlnet", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()


def classes_of(prepared):
    return json.loads((prepared / "manifest.json").read_text())["classes"]


def tiny_config(prepared, mode="adapter", resolution=64, **kwargs):
    return HTDConfig(base_model="local:tiny", classes=classes_of(prepared), resolution=resolution, crop_mode=mode,
                     crop_size=32, max_crops=2, embed_dim=32, lora_rank=4, lora_alpha=8, **kwargs)


def batch_of(prepared, config, n=2):
    stream = TrainingStream(prepared, config.resolution, config.max_crops, config.crop_size, config.crop_mode,
                            shuffle_buffer=1)
    return collate_samples([item for _, item in zip(range(n), stream, strict=False)])


ZERO_INITIALISED = ("lora_B", "controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def perturb_lora_b(model, scale=0.05):
    """Make the zero-initialised parts (LoRA B, ControlNet zero convolutions) non-zero, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ZERO_INITIALISED):
                param.add_(torch.randn_like(param) * scale)


def train(args_list):
    """Run the recipe in-process with a fresh accelerate state, reset again afterwards so that no later test in
    the process (e.g. the GPU suite's bf16 recipe run) finds this run's state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    try:
        return recipe.cli(args_list)
    finally:
        reset()


def demo_args(base, data, out, *extra):
    return ["--config", str(DEMO), "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data),
            "--output_dir", str(out), "--report_to", "none", *extra]


def test_repeated_steps_on_a_fixed_batch_lower_the_loss(prepared, tiny_base_sd15):
    config = tiny_config(prepared)
    model = HTDModel.from_base(config, tiny_base_sd15)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    batch = batch_of(prepared, config)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = training_loss(model, scheduler, batch, torch.Generator().manual_seed(0),
                                    HTDConfig(**{**config.__dict__, "crop_dropout": 0.0}))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("mode", CROP_MODES)
def test_every_trainable_part_receives_gradients(prepared, tiny_base_sd15, mode):
    config = tiny_config(prepared, mode, resolution=128)  # at 64 px the mid block attends over one token
    model = HTDModel.from_base(config, tiny_base_sd15)
    perturb_lora_b(model)  # zero-initialised parts would block the gradient to what lies behind them
    from diffusers import DDPMScheduler

    batch = batch_of(prepared, config)
    cfg = HTDConfig(**{**config.__dict__, "crop_dropout": 0.0})
    training_loss(model, DDPMScheduler.from_config(model.scheduler_config), batch,
                         torch.Generator().manual_seed(0), cfg).backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert without == []
    groups = {"controlnet.", "lora_A", "lora_B"}
    if config.uses_crop_tokens:
        groups |= {"to_k_ip", "to_v_ip", "encoder_hid_proj", "crop_encoder."}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(any(g in n for n in names) for g in groups)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("vae.") for n in frozen) and any(n.endswith("to_q.base_layer.weight") for n in frozen)


@pytest.mark.parametrize("mode", CROP_MODES)
def test_save_load_reproduces_outputs_exactly(prepared, tiny_base_sd15, tmp_path, mode):
    config = tiny_config(prepared, mode)
    model = HTDModel.from_base(config, tiny_base_sd15)
    perturb_lora_b(model)  # and every other trained part, so the check cannot pass on initial weights
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(tmp_path / "m", embed_base=tiny_base_sd15)
    loaded = HTDModel.from_pretrained(tmp_path / "m")
    batch = batch_of(prepared, config)
    cond = batch["conditioning"]
    noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 700])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(noisy, t, cond), loaded(noisy, t, cond))


def test_folder_loads_with_stock_diffusers_apis(prepared, tiny_base_sd15, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    config = tiny_config(prepared)
    model = HTDModel.from_base(config, tiny_base_sd15)
    perturb_lora_b(model)
    out = model.save_pretrained(tmp_path / "m")
    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    assert controlnet.config.conditioning_channels == 3
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_base_sd15, controlnet=controlnet, safety_checker=None)
    pipe.load_lora_weights(out)
    pipe.load_ip_adapter(str(out), subfolder="crop_adapter", weight_name="ip_adapter.safetensors",
                         image_encoder_folder=None)
    processors = [p for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")]
    assert len(processors) == 10 and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in processors)
    lora = dict(model.unet.named_parameters())
    name = next(n for n in lora if "lora_B" in n)
    loaded = dict(pipe.unet.named_parameters())[name.replace(".default.", ".default_0.")]
    assert torch.equal(lora[name], loaded)


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_resume_from_checkpoint_ends_with_the_uninterrupted_weights(prepared, tiny_base_sd15, tmp_path, accumulation):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ("--validation_steps", "0", "--gradient_accumulation_steps", accumulation)
    assert train(demo_args(tiny_base_sd15, prepared, full, *extra)) == 0
    assert (full / "checkpoint-3").exists() and (full / "checkpoint-6").exists()
    resumed.mkdir()
    import shutil

    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    assert train(demo_args(tiny_base_sd15, prepared, resumed, *extra, "--resume_from_checkpoint", "latest")) == 0
    for name in ("controlnet/diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors",
                 "crop_adapter/ip_adapter.safetensors", "crop_adapter/crop_encoder/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    first = load_file(full / "checkpoint-3" / "trainable.safetensors")
    last = load_file(full / "checkpoint-6" / "trainable.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it did train between 3 and 6


def test_every_checkpoint_is_a_model_folder(prepared, tiny_base_sd15, tmp_path, capsys, monkeypatch, caplog):
    """checkpoint-N holds the model-folder layout beside the training state: it loads with
    HTDPipeline.from_pretrained with the weights of step N, and generate takes it as --model."""
    from tests.test_generate import gen_args

    out = tmp_path / "run"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                           "--validation_steps", "0")) == 0
    trained = load_file(out / "checkpoint-2" / "trainable.safetensors")
    saved = load_file(out / "checkpoint-2" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(value, trained[f"controlnet.{name}"]) for name, value in saved.items())
    early, final = HTDPipeline.from_pretrained(out / "checkpoint-2"), HTDPipeline.from_pretrained(out)
    item = next(iter(TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False)))
    cond = Conditioning.stack([item["conditioning"]])
    image, later = (pipe(conditioning=cond, generator=pipe.seeded([0]), num_inference_steps=2, output_type="np").images
                    for pipe in (early, final))
    assert image.shape == (1, 64, 64, 3) and not np.array_equal(image, later)
    assert run_cli(gen_args(out / "checkpoint-4", prepared, tmp_path / "bundle", 2), capsys)[0] == 0
    assert HTDPipeline.from_pretrained(out / "checkpoint-4").htd_config == final.htd_config
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    code, _, err = run_cli(["push", str(out / "checkpoint-2"), "user/checkpoint-2"], capsys)
    assert code == 0, err
    assert not [r for r in caplog.records if "left out of the push" in r.getMessage()]
    files = set(HfApi(token=USER_TOKEN).list_repo_files("user/checkpoint-2"))
    assert {"README.md", "htd_config.json", "controlnet/diffusion_pytorch_model.safetensors"} <= files
    assert not files & {"trainable.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
    card = (out / "checkpoint-2" / "README.md").read_text()  # as pushed: it loads from the repo
    assert 'HTDPipeline.from_pretrained("user/checkpoint-2")' in card and "--model user/checkpoint-2 " in card


def glass_of(prepared: Path) -> list[float]:
    """The median of the training patches' bright, grey background pixels, counted here by hand."""
    from htd_toolkit.evaluate.sets import load_set

    train = load_set(prepared, "train")
    pixels = train.images[train.masks == 0].astype(int)
    grey = (pixels.min(1) >= 190) & (pixels.max(1) - pixels.min(1) <= 20)
    return np.median(pixels[grey], axis=0).tolist()


@pytest.mark.parametrize("mode", CROP_MODES)
def test_each_crop_mode_trains_and_generates(prepared, tiny_base_sd15, tmp_path, mode):
    out = tmp_path / mode
    assert train(demo_args(tiny_base_sd15, prepared, out, "--crop_mode", mode, "--max_train_steps", "2",
                           "--checkpointing_steps", "0", "--validation_steps", "2")) == 0
    config = json.loads((out / "htd_config.json").read_text())
    assert config["crop_mode"] == mode and config["base_model"] == "local:base"
    assert config["glass_rgb"] == pytest.approx(glass_of(prepared), abs=4)  # recorded from the training data
    assert (out / "validation" / "step-000002.png").exists() and (out / "README.md").exists()
    assert not list(out.glob("checkpoint-*"))
    pipe = HTDPipeline.from_pretrained(out)
    stream = TrainingStream(prepared, 64, 2, 32, mode, shuffle_buffer=1, augment=False)
    item = next(iter(stream))
    cond = Conditioning.stack([item["conditioning"]])
    image = pipe(conditioning=cond, generator=pipe.seeded([0]), num_inference_steps=3, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8


def test_model_card_metadata_and_checkpoint_pruning(prepared, tiny_base_sd15, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "m"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "4", "--checkpointing_steps", "1",
                           "--checkpoints_total_limit", "2", "--validation_steps", "0", "--logging_steps", "3",
                           "--report_to", "tensorboard")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    losses = events.Scalars("loss")  # the mean of the steps since the last log, and the last step
    assert [e.step for e in losses] == [3, 4] and all(np.isfinite(e.value) for e in losses)
    card = ModelCard.load(out / "README.md")  # parsed back by huggingface_hub
    assert card.data.library_name == "diffusers" and "histopathology" in card.data.tags
    assert "| 2 | tumor |" in card.text and 'HTDPipeline.from_pretrained("m")' in card.text
    assert 'HTDPipeline.from_pretrained("m/checkpoint-4")' in (out / "checkpoint-4" / "README.md").read_text()
    assert ".partial" not in card.text  # the staging folder the card was written in
    for name in ("README.md", "htd_config.json", "id2label.json"):  # published files hold no local path
        assert str(tmp_path) not in (out / name).read_text() and str(tiny_base_sd15) not in (out / name).read_text()


@pytest.mark.parametrize("case, extra, message", [
    ("missing base", ["--pretrained_model_name_or_path", "/nonexistent/base"], "base model not found"),
    ("resolution", ["--resolution", "60"], "not divisible by 8"),
    ("logging", ["--logging_steps", "0"], "--logging_steps 0"),
    ("classes", [], "differ from the config"),
])
def test_bad_input_is_one_line_before_heavy_work(prepared, tiny_base_sd15, tmp_path, capsys, case, extra, message):
    args = demo_args(tiny_base_sd15, prepared, tmp_path / "o")
    if case == "classes":
        cfg = tmp_path / "c.yaml"
        cfg.write_text(DEMO.read_text() + "classes: [background, tumor]\n")
        args[1] = str(cfg)
    assert train(args + extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "o" / "controlnet").exists()


def test_out_of_memory_is_one_line(prepared, tiny_base_sd15, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(recipe, "training_loss", out_of_memory)
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "o", "--validation_steps", "0")) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory at --train_batch_size 2: lower it" in err and "Traceback" not in err


def test_unknown_config_keys_and_empty_dataset(prepared, tiny_base_sd15, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rat: 0.1\nresolution: 64\n")
    assert train(["--config", str(cfg), "--train_data_dir", str(prepared)]) == 1
    assert "unknown config key(s) learning_rat" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"classes": classes_of(prepared), "shards": [],
                                                     "splits": {"train": 0}}))
    assert train(demo_args(tiny_base_sd15, empty, tmp_path / "o")) == 1
    assert "no training samples" in capsys.readouterr().err


def test_two_process_accelerate_run(prepared, tiny_base_sd15, tmp_path):
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_two_process.yaml"),
           str(RECIPE), *demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "4", "--checkpointing_steps",
                                   "2", "--checkpoints_total_limit", "1", "--validation_steps", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    shares = re.findall(r"process (\d) of (\d) trained on (\d+) distinct samples \(keys (\w+)\)", result.stderr)
    assert sorted((rank, world) for rank, world, _, _ in shares) == [("0", "2"), ("1", "2")], result.stderr[-4000:]
    assert all(int(n) > 0 for _, _, n, _ in shares) and shares[0][3] != shares[1][3]  # each its own samples
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert (out / "validation" / "step-000004.png").exists() and (out / "htd_config.json").exists()
    assert HTDPipeline.from_pretrained(out).htd_config.crop_mode == "adapter"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_on_loopback(prepared, tiny_base_sd15, tmp_path):
    """The multi-node path of the docs: one `accelerate launch` per machine, machine_rank 0 and 1, the main
    process's address and port; here both machines are this one, talking over 127.0.0.1."""
    out, port = tmp_path / "nodes", free_port()
    launcher = Path(sys.executable).with_name("accelerate")
    runs = []
    for machine in (0, 1):
        cmd = [str(launcher), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
               str(RECIPE), *demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "2",
                                       "--checkpointing_steps", "0", "--validation_steps", "0")]
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}))
    logs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for machine, log in enumerate(logs):
        assert re.search(rf"process {machine} of 2 trained on [1-9]\d* distinct samples", log), log[-3000:]
    assert (out / "htd_config.json").exists()


def test_push_to_hub_uploads_the_folder_without_checkpoints(prepared, tiny_base_sd15, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    out = tmp_path / "pushed"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                           "--validation_steps", "0", "--push_to_hub", "--hub_model_id", "user/trained")) == 0
    api = HfApi(token=USER_TOKEN)
    files = set(api.list_repo_files("user/trained"))
    assert api.model_info("user/trained").private is True
    assert {"htd_config.json", "README.md", "pytorch_lora_weights.safetensors", "crop_adapter/ip_adapter.safetensors",
            "controlnet/diffusion_pytorch_model.safetensors"} <= files
    assert (out / "checkpoint-2").exists() and not any(f.startswith("checkpoint-") for f in files)


def test_stain_jitter_recolours_each_image_and_its_crops_together(prepared):
    """The crops are cut after the recolouring: under a strong jitter each crop's colour follows its
    region's colour in the returned image, which it would not if they were cut from the raw image."""
    def items(jitter):
        stream = TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, stain_jitter=jitter)
        return [item for _, item in zip(range(24), stream, strict=False)]

    crop_rgb, region_rgb, moved = [], [], []
    for plain, jittered in zip(items((0.0, 0.0)), items((0.8, 0.05)), strict=True):
        cond = jittered["conditioning"]
        moved.append(float((jittered["pixel_values"] - plain["pixel_values"]).abs().mean()))
        for slot, cls in enumerate(cond.crop_classes.tolist()):
            region = cond.class_map == cls
            if cls and region.sum() >= 64:
                crop_rgb.append(cond.crops[slot].mean((1, 2)).numpy())
                region_rgb.append(jittered["pixel_values"][:, region].mean(1).numpy())
    crop_rgb, region_rgb = np.array(crop_rgb), np.array(region_rgb)
    assert np.mean(moved) > 0.05  # the jitter is on
    assert len(crop_rgb) >= 12
    assert all(np.corrcoef(crop_rgb[:, c], region_rgb[:, c])[0, 1] > 0.8 for c in range(3))


def test_stain_jitter_needs_pixels(prepared, tiny_base_sd15, tmp_path, capsys):
    code = train(demo_args(tiny_base_sd15, prepared, tmp_path / "m", "--cache_latents", "--stain_jitter", "0.2"))
    assert code != 0 and "--stain_jitter recolours pixels" in capsys.readouterr().err


def test_sharing_controlnet_residuals_between_cfg_halves_changes_nothing(prepared, tiny_base_sd15, tmp_path):
    config = tiny_config(prepared)
    model = HTDModel.from_base(config, tiny_base_sd15)
    perturb_lora_b(model)
    model.save_pretrained(tmp_path / "m", embed_base=tiny_base_sd15)
    item = next(iter(TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False)))
    cond = Conditioning.stack([item["conditioning"]] * 2)
    pipe = HTDPipeline.from_pretrained(tmp_path / "m")
    def images():
        return pipe(conditioning=cond, generator=pipe.seeded([0, 1]), num_inference_steps=4, guidance_scale=3.0,
                    output_type="np").images

    shared = images()
    pipe.share_controlnet = False
    unshared = images()
    assert np.abs(shared.astype(int) - unshared.astype(int)).max() <= 1  # same up to float summation order


def test_fusing_lora_and_projections_for_inference_changes_nothing(prepared, tiny_base_sd15, tmp_path):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    config = tiny_config(prepared)
    model = HTDModel.from_base(config, tiny_base_sd15)
    perturb_lora_b(model, scale=0.5)  # a LoRA that moves the images, so merging it is visible
    model.save_pretrained(tmp_path / "m", embed_base=tiny_base_sd15)
    item = next(iter(TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False)))
    cond = Conditioning.stack([item["conditioning"]] * 2)
    fused = HTDPipeline.from_pretrained(tmp_path / "m")
    unfused = HTDPipeline.from_pretrained(tmp_path / "m", fuse=False)
    unet = fused.model.unet
    assert not any("lora_" in name for name, _ in unet.named_parameters())
    assert all(isinstance(p, FusedAttnProcessor2_0) == name.endswith("attn1.processor")
               for name, p in unet.attn_processors.items())
    def generate(pipe):
        return pipe(conditioning=cond, generator=pipe.seeded([0, 1]), num_inference_steps=4, guidance_scale=3.0,
                    output_type="np").images

    images = [generate(pipe) for pipe in (fused, unfused)]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1  # same up to float summation order
    unfused.model.unet.disable_lora()
    without_lora = generate(unfused)
    assert np.abs(images[0].astype(int) - without_lora.astype(int)).max() > 4  # the merged LoRA is in effect
    with pytest.raises(UserError, match="fused for inference"):
        fused.model.save_pretrained(tmp_path / "again")


@pytest.mark.slow  # torch.compile of forward and backward takes minutes on 2 CPU cores
@pytest.mark.timeout(900)
def test_torch_compile_trains_and_saves_the_same_folder_layout(prepared, tiny_base_sd15, tmp_path):
    out = tmp_path / "compiled"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                           "--validation_steps", "0", "--torch_compile")) == 0
    plain = tmp_path / "plain"
    assert train(demo_args(tiny_base_sd15, prepared, plain, "--max_train_steps", "2", "--checkpointing_steps", "2",
                           "--validation_steps", "0")) == 0
    for name in ("checkpoint-2/trainable.safetensors", "pytorch_lora_weights.safetensors"):
        assert load_file(out / name).keys() == load_file(plain / name).keys()


@pytest.mark.parametrize("world_size", [1, 2])
def test_stream_splits_samples_between_workers_and_processes(prepared, world_size):
    from torch.utils.data import DataLoader

    seen = []
    for rank in range(world_size):
        stream = TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=4, rank=rank, world_size=world_size)
        stream.set_epoch(1)
        loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_samples)
        keys = [key for batch in loader for key in batch["__key__"]]
        batches_here = stream.batches_per_epoch(2, 2)
        batches = len(list(DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_samples)))
        assert len(keys) == len(stream) and batches_here == batches
        seen += keys
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(seen) == len(set(seen)) == manifest["splits"]["train"] // world_size * world_size


def test_cached_latents_give_the_loss_of_the_pixels(prepared, tiny_base_sd15, tmp_path):
    from diffusers import DDPMScheduler

    config = tiny_config(prepared, crop_dropout=0.0)
    out = tmp_path / "cached"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "2", "--checkpointing_steps", "0",
                           "--validation_steps", "0", "--cache_latents")) == 0
    cache = load_file(next((out / "latents-cache").glob("*.safetensors")))
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(cache) == manifest["splits"]["train"]
    model = HTDModel.from_base(config, tiny_base_sd15)
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    plain = TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False)
    cached = TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, latents=cache)
    a, b = next(iter(plain)), next(iter(cached))
    assert a["__key__"] == b["__key__"] and "pixel_values" not in b

    def loss(item):
        return training_loss(model, scheduler, collate_samples([item]), torch.Generator().manual_seed(0), config).item()

    assert loss(a) == pytest.approx(loss(b), rel=1e-4)


KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from accelerate import Accelerator
from htd_toolkit.models.htd_model import HTDModel
from tests.test_training import recipe

def kill_half_way(folder):  # a real kill -9: no exception handler, no cleanup runs
    (Path(folder) / "controlnet").mkdir(parents=True, exist_ok=True)
    (Path(folder) / "controlnet" / "config.json").write_text('{{"_class_name": "Contr')
    os.kill(os.getpid(), signal.SIGKILL)

if {point!r} == "final save":  # checkpoints hold a model folder too: only the final one is killed
    real = HTDModel.save_pretrained
    HTDModel.save_pretrained = lambda self, folder, **kw: (kill_half_way(folder) if "final.partial" in str(folder)
                                                           else real(self, folder, **kw))
else:
    real = Accelerator.save_state
    Accelerator.save_state = lambda self, folder, **kw: (kill_half_way(folder) if "checkpoint-6" in str(folder)
                                                         else real(self, folder, **kw))
sys.exit(recipe.cli(sys.argv[1:]))
"""


@pytest.mark.parametrize("point", ["checkpoint-6", "final save"])
def test_kill_9_while_saving_then_resume_gives_the_uninterrupted_weights(prepared, tiny_base_sd15, tmp_path, point):
    """A real kill -9 in the middle of writing checkpoint-6 (with --checkpoints_total_limit 1) or the final
    model: nothing half-written sits under a final name, the last complete checkpoint is still there, and
    --resume_from_checkpoint latest ends with the weights of an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ("--validation_steps", "0", "--checkpoints_total_limit", "1")
    assert train(demo_args(tiny_base_sd15, prepared, full, *extra)) == 0
    driver = tmp_path / "killer.py"
    driver.write_text(KILLER.format(root=str(ROOT), point=point))
    run = subprocess.run([sys.executable, str(driver), *demo_args(tiny_base_sd15, prepared, killed, *extra)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert not (killed / "htd_config.json").exists() and not (killed / "controlnet").exists()
    expected = ["checkpoint-3", "checkpoint-6.partial"] if point == "checkpoint-6" else ["checkpoint-6"]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == expected
    assert train(demo_args(tiny_base_sd15, prepared, killed, *extra, "--resume_from_checkpoint", "latest")) == 0
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-6"]
    assert not (killed / "final.partial").exists()
    a, b = load_file(full / "controlnet" / "diffusion_pytorch_model.safetensors"), \
        load_file(killed / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    HTDModel.from_pretrained(killed)


def test_a_loss_that_becomes_nan_stops_the_run_in_one_line_keeping_the_last_checkpoint(prepared, tiny_base_sd15,
                                                                                       tmp_path, monkeypatch, capsys):
    real_loss = recipe.training_loss
    calls = []

    def nan_from_the_fifth_step(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 5 else loss

    monkeypatch.setattr(recipe, "training_loss", nan_from_the_fifth_step)
    out = tmp_path / "nan"
    code = train(demo_args(tiny_base_sd15, prepared, out, "--validation_steps", "0", "--logging_steps", "100"))
    errors = [line.split("error: ", 1)[1] for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert code == 1 and len(errors) == 1  # (after the progress bar's last update, on its line)
    err = errors[0]
    assert "the training loss became NaN or infinite by step 6" in err
    assert "the last good checkpoint (checkpoint-3) is kept" in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (out / "htd_config.json").exists()


@pytest.mark.parametrize("flag, value", [
    ("--learning_rate", "nan"), ("--lora_learning_rate", "inf"), ("--max_train_steps", "-1"),
    ("--train_batch_size", "0"), ("--resolution", "0"), ("--crop_dropout", "1.5"), ("--max_grad_norm", "0"),
    ("--gradient_accumulation_steps", "0"), ("--validation_guidance_scale", "nan"), ("--stain_jitter", "nan"),
    ("--stain_jitter", "1.5"), ("--stain_jitter_shift", "-0.1"),
])
def test_recipe_refuses_bad_numbers_in_one_line(prepared, tiny_base_sd15, tmp_path, capsys, flag, value):
    code = train(demo_args(tiny_base_sd15, prepared, tmp_path / "m", flag, value))
    err = capsys.readouterr().err
    assert code == 1 and f"{flag} {value}" in err and "expected a finite number" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_recipe_output_dir_that_is_a_file_is_one_line_before_training(prepared, tiny_base_sd15, tmp_path, capsys):
    (tmp_path / "m").write_text("a file")
    code = train(demo_args(tiny_base_sd15, prepared, tmp_path / "m"))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "exists and is not a folder; --output_dir names a folder" in err


def test_training_from_a_hub_dataset_equals_training_from_the_folder(prepared, tiny_base_sd15, tmp_path, capsys,
                                                                     monkeypatch):
    """`--dataset_name user/prepared` (pushed with `push --training-data`, private) trains to the same weights,
    tensor for tensor, as `--train_data_dir` on the folder it was pushed from; the card names the repo."""
    from htd_toolkit.testing.hubserver import USER_TOKEN

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    monkeypatch.setenv("HTD_CACHE", str(tmp_path / "cache"))
    assert run_cli(["push", str(prepared), "user/prepared", "--training-data"], capsys)[0] == 0
    extra = ("--max_train_steps", "2", "--checkpointing_steps", "0", "--validation_steps", "0")
    assert train(demo_args(tiny_base_sd15, prepared, tmp_path / "local", *extra)) == 0
    hub = demo_args(tiny_base_sd15, prepared, tmp_path / "hub", *extra, "--dataset_name", "user/prepared")
    hub = hub[:hub.index("--train_data_dir")] + hub[hub.index("--train_data_dir") + 2:]
    assert train(hub) == 0
    for name in ("controlnet/diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors",
                 "crop_adapter/ip_adapter.safetensors"):
        a, b = load_file(tmp_path / "local" / name), load_file(tmp_path / "hub" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "user/prepared" in (tmp_path / "hub" / "README.md").read_text()
    assert train([*hub, "--dataset_name", "user/missing"]) == 1
    assert "--dataset_name user/missing: no such dataset repo" in capsys.readouterr().err


def test_every_recipe_flag_has_help_and_num_train_epochs_sets_the_steps(prepared, tiny_base_sd15, tmp_path):
    parser_help = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True).stdout
    for flag in ("--num_train_epochs", "--adam_beta1", "--adam_beta2", "--adam_epsilon", "--scale_lr",
                 "--logging_dir", "--tracker_project_name", "--report_to", "--dataset_name", "--dataset_revision"):
        assert flag in parser_help, flag
    assert set(recipe.HELP) == set(recipe.DEFAULTS) and all(recipe.HELP.values())
    out = tmp_path / "epochs"
    args = demo_args(tiny_base_sd15, prepared, out, "--num_train_epochs", "2", "--train_batch_size", "2",
                     "--checkpointing_steps", "0", "--validation_steps", "1000", "--scale_lr", "--adam_beta2", "0.99")
    parsed = recipe.parse_args(args)
    per_epoch = TrainingStream(prepared, 64, 2, 32, "adapter").batches_per_epoch(2, parsed.dataloader_num_workers)
    assert train(args) == 0
    assert [p.name for p in (out / "validation").iterdir()] == [f"step-{2 * per_epoch:06d}.png"]  # the final grid


def test_a_training_step_scales_the_latents_by_the_vae_scaling_factor(prepared, tiny_base_sd15):
    """Mutation audit survivor: the shipped H&E base has scaling_factor 1.0, so latents left unscaled passed
    every test; Stable Diffusion's (and the tiny base's) is 0.18215. The step on pixels must be the step
    on the VAE's posterior means scaled by hand."""
    from diffusers import DDPMScheduler

    config = tiny_config(prepared, crop_dropout=0.0)
    model = HTDModel.from_base(config, tiny_base_sd15)
    assert model.vae.config.scaling_factor == 0.18215
    # v-prediction: the target holds the latents themselves, so their scale shows in the loss
    scheduler = DDPMScheduler.from_config(model.scheduler_config, prediction_type="v_prediction")
    batch = batch_of(prepared, config)
    without_pixels = {k: v for k, v in batch.items() if k != "pixel_values"}

    def loss(step_batch):  # seed 2: timesteps 400 and 650, where the latents' scale moves a v-target most
        return training_loss(model, scheduler, step_batch, torch.Generator().manual_seed(2), config).item()

    with torch.no_grad():
        means = model.vae.encode(batch["pixel_values"]).latent_dist.mean
        on_pixels, scaled, unscaled = loss(batch), loss({**without_pixels, "latents": means * 0.18215}), \
            loss({**without_pixels, "latents": means})
    assert on_pixels == pytest.approx(scaled, rel=1e-6)
    assert abs(scaled - unscaled) > 0.01 * scaled, (scaled, unscaled)


def test_guidance_0_gives_the_crop_free_prediction_and_1_the_conditional_one(prepared, tiny_base_sd15):
    """Mutation audit survivor: guidance written as cond + g·(cond − uncond) passed every test. The pipeline's
    guided noise estimate against the model's own predictions with the crops kept and dropped."""
    model = HTDModel.from_base(tiny_config(prepared), tiny_base_sd15)
    perturb_lora_b(model)
    pipe = HTDPipeline.from_model(model)
    items = iter(TrainingStream(prepared, 64, 2, 32, "adapter", shuffle_buffer=1, augment=False))
    cond = Conditioning.stack([next(items)["conditioning"] for _ in range(2)])
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[1]
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    x, keep = pipe.scheduler.scale_model_input(latents, t), torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        conditional, crop_free = (model(x, t.expand(2), cond, keep_crops=k) for k in (keep, ~keep))
    assert (conditional - crop_free).abs().max() > 0.1  # the crops move the prediction
    expected = [(0.0, crop_free), (1.0, conditional), (3.0, crop_free + 3 * (conditional - crop_free))]
    for share in (True, False):  # one ControlNet pass for both halves, and two
        pipe.share_controlnet = share
        for guidance, prediction in expected:
            torch.testing.assert_close(pipe.noise_prediction(latents, t, conditioning=cond, guidance_scale=guidance),
                                       prediction, atol=1e-5,
                                       rtol=1e-4)


def trainable_vector(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[name].flatten().double() for name in names])


@pytest.mark.slow  # two recipe runs of 10 steps, one of them two real processes: about 2 minutes on 2 cores
def test_two_processes_end_with_the_weights_of_one_at_the_same_global_batch(prepared, tiny_base_sd15, tmp_path):
    """Issue 30: one process at batch 4 and two real processes (accelerate launch, gloo) at batch 2 each, same
    seed and data, train on the same samples in the same steps with the same noise, timesteps, dropout, flips,
    stain jitter and crops, under a warm-up schedule: after 10 steps the weights differ by float reduction
    order only, far below the update itself."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--max_train_steps", "10", "--checkpointing_steps", "10", "--validation_steps", "0",
             "--max_train_samples", "8", "--lr_scheduler", "linear", "--lr_warmup_steps", "3", "--stain_jitter",
             "0.1", "--dataloader_num_workers", "1")
    assert train(demo_args(tiny_base_sd15, prepared, one, *extra, "--train_batch_size", "4")) == 0
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_two_process.yaml"),
           str(RECIPE), *demo_args(tiny_base_sd15, prepared, two, *extra, "--train_batch_size", "2")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(re.findall(r"process \d of 2 trained on", result.stderr)) == 2, result.stderr[-3000:]
    initial = HTDModel.from_base(HTDConfig.load(one), tiny_base_sd15, seed=0)
    names = [name for name, param in initial.named_parameters() if param.requires_grad]
    start = trainable_vector(dict(initial.named_parameters()), names).detach()
    a, b = (trainable_vector(load_file(out / "checkpoint-10" / "trainable.safetensors"), names) for out in (one, two))
    update, difference = float((a - start).norm()), float((a - b).norm())
    print(f"update norm {update:.4g}, one vs two processes {difference:.3g} ({difference / update:.2e} of the update)")
    assert update > 0.1 and difference <= 1e-3 * update
