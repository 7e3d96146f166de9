#!/usr/bin/env python
"""Train HeteroTissue-Diffuse: UNet LoRA + semantic-map ControlNet + crop adapter, with accelerate.

    accelerate launch recipes/train_controlnet.py --config recipes/configs/camelyon16.yaml \\
        [--pretrained_model_name_or_path ID_OR_DIR] [--train_data_dir DIR] [--output_dir DIR] ...
    accelerate launch -m htd_toolkit.recipes.train_controlnet --config camelyon16 ...   # from an installed wheel

Flags override the YAML config; names follow diffusers' training scripts. The base (UNet, VAE, text
encoder) stays frozen; ControlNet, LoRA and the crop adapter train in fp32 under accelerate's mixed
precision. Checkpoints (`checkpoint-N/`) hold only the trainable weights, the optimizer, the LR
schedule and the step; every random draw of a sample at step N derives from (seed, N, its key) and the
data order from (seed, epoch), so a resumed run ends with the weights of an uninterrupted one, and N
processes with those of one process at the same global batch. At the end the model folder (docs/formats.md,
"The model folder") is written with its card, and `--push_to_hub` uploads it (never `checkpoint-*`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import sys
from dataclasses import fields
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from PIL import Image

from htd_toolkit.base.shipped import SHIPPED_BASE_ID, shipped_base
from htd_toolkit.classes import FINGERPRINT, check_same_classes, check_same_names, class_specs, colorize
from htd_toolkit.config import keep_compiled_kernels
from htd_toolkit.data.outputs import writable_folder
from htd_toolkit.distributed import cpu_only
from htd_toolkit.downloads import checked_revision
from htd_toolkit.errors import UserError, check_number, one_line
from htd_toolkit.models import CROP_MODES, GUIDANCE_SCALE, MAX_GUIDANCE_SCALE
from htd_toolkit.models.background import GLASS_TILE_MIN_SHARE, GlassBank
from htd_toolkit.models.htd_model import CONFIG_NAME, SIZE_LIMITS, HTDConfig, HTDModel
from htd_toolkit.models.pipeline import HTDPipeline
from htd_toolkit.models.training import (
    batch_to_device,
    make_optimizer,
    prepare_for_training,
    sample_generators,
    training_loss,
)
from htd_toolkit.publish.cards import write_model_card
from htd_toolkit.publish.hub import check_visibility

logger = logging.getLogger("train_controlnet")
TRAINABLE_WEIGHTS = "trainable.safetensors"  # a checkpoint's trainable tensors by name: what resuming reads
EMBED_BASE_MAX_BYTES = 100 * 2**20  # local bases smaller than this are copied into the model folder

# What the model folder records (htd_config.json): its defaults live once, in HTDConfig.
MODEL_OPTIONS = ("resolution", "crop_mode", "crop_size", "max_crops", "embed_dim", "crop_dropout", "map_dropout",
                 "prompt", "lora_rank", "lora_alpha")
MODEL_DEFAULTS = {f.name: f.default for f in fields(HTDConfig) if f.name in MODEL_OPTIONS}


class Option(NamedTuple):
    """One recipe option, declared once: its default, its help, its type (the default's unless given; str when
    the default is None), and for numbers the bounds `check_numbers` applies (`low`/`high`; `above`: low
    excluded, `below`: high excluded; NaN and inf never pass). `nargs`/`choices` as argparse's."""

    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    type: type | None = None
    above: bool = False
    below: bool = False
    choices: tuple[str, ...] | None = None
    nargs: str | None = None

    @property
    def kind(self) -> type:
        return self.type or (type(self.default) if self.default is not None else str)

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None


OPTIONS = {
    "pretrained_model_name_or_path": Option("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                            "Stable Diffusion base: a Hub id or a local diffusers folder."),
    "revision": Option(None, "Revision (branch, tag or commit) of the base on the Hub."),
    "variant": Option(None, "Variant of the base's weight files to load (e.g. fp16: *.fp16.safetensors), as "
                            "diffusers' from_pretrained; the trained weights stay fp32."),
    "controlnet_model_name_or_path": Option(
        None, "Start from this ControlNet (Hub id or local folder, ControlNetModel.from_pretrained) instead of one "
              "copied from the UNet: the usual way to fine-tune one. Its conditioning_channels must be the map's "
              "(one per class, +3 with --crop_mode canvas)."),
    "cache_dir": Option(None, "Where Hub downloads of the base and --controlnet_model_name_or_path are cached "
                              "(default: the Hugging Face cache)."),
    "train_data_dir": Option(None, "A dataset folder written by `htd-toolkit prepare`."),
    "dataset_name": Option(None, "Instead of --train_data_dir: a prepared dataset pushed with `htd-toolkit push "
                                 "--training-data` (ORG/NAME; private repos with the usual HF_TOKEN / `hf auth login`)."),
    "dataset_revision": Option(None, "Revision of --dataset_name."),
    "max_train_samples": Option(None, "Train on this many samples of the training split only (a subset drawn with "
                                      "--seed, the same every epoch), for debugging or quicker training.",
                                1, type=int),
    "output_dir": Option("htd-model", "Where the model folder, checkpoints, validation grids and logs go."),
    "train_batch_size": Option(8, "Samples per process and step.", 1),
    "gradient_accumulation_steps": Option(1, "Batches accumulated per optimizer step.", 1),
    "max_train_steps": Option(20000, "Optimizer steps in all (ignored when --num_train_epochs is given).", 1),
    "num_train_epochs": Option(None, "Train for this many passes over the training split instead of "
                                     "--max_train_steps.", 1, type=int),
    "learning_rate": Option(1e-5, "Learning rate of the ControlNet and the crop adapter.", 0, 1, above=True),
    "lora_learning_rate": Option(1e-4, "Learning rate of the UNet's LoRA.", 0, 1, above=True),
    "lr_scheduler": Option("constant", "diffusers scheduler name: constant, constant_with_warmup, linear, cosine, "
                                       "cosine_with_restarts, polynomial, ..."),
    "lr_warmup_steps": Option(0, "Warm-up steps of the learning-rate schedule.", 0),
    "lr_num_cycles": Option(1, "Hard resets of the cosine_with_restarts schedule.", 1),
    "lr_power": Option(1.0, "Power factor of the polynomial schedule.", 0, above=True),
    "scale_lr": Option(False, "Multiply both learning rates by batch size x accumulation x processes, as diffusers' "
                              "examples do."),
    "use_8bit_adam": Option(False, "bitsandbytes' 8-bit AdamW (less optimizer memory; needs bitsandbytes)."),
    "adam_beta1": Option(0.9, "AdamW beta1.", 0, 1, below=True),  # AdamW's betas lie in [0, 1)
    "adam_beta2": Option(0.999, "AdamW beta2.", 0, 1, below=True),
    "adam_weight_decay": Option(1e-2, "AdamW weight decay.", 0),
    "adam_epsilon": Option(1e-8, "AdamW epsilon.", 0, 1, above=True),
    "max_grad_norm": Option(1.0, "Gradient clipping norm.", 0, above=True),
    "set_grads_to_none": Option(True, "Free the gradients (set them to None) after each step instead of zeroing "
                                      "them: less memory. On by default here (diffusers' default is off); "
                                      "--no-set_grads_to_none zeroes them."),
    "checkpointing_steps": Option(500, "Save a checkpoint (training state + model folder) every N steps; 0: none.", 0),
    "checkpoints_total_limit": Option(3, "Keep at most this many checkpoints.", 0),
    "resume_from_checkpoint": Option(None, "`latest` or a checkpoint folder to continue from."),
    "seed": Option(0, "Seed of the data order, noise, timesteps and dropout (a resumed run ends with the same "
                      "weights, and so does a run on another number of processes with the same global batch)."),
    "mixed_precision": Option(None, "no, fp16 or bf16 (default: accelerate's configuration).",
                              choices=("no", "fp16", "bf16")),
    # what the model folder records (htd_config.json): defaults from HTDConfig, sizes bounded as a folder's
    "resolution": Option(MODEL_DEFAULTS["resolution"], "Training image side in pixels (patches are resized to it).",
                         *SIZE_LIMITS["resolution"]),
    "crop_mode": Option(MODEL_DEFAULTS["crop_mode"], "How crops condition the model: adapter (the paper's), canvas, "
                                                     "embedding or none.", choices=CROP_MODES),
    "crop_size": Option(MODEL_DEFAULTS["crop_size"], "Side of the crops fed to the crop adapter, pixels.",
                        *SIZE_LIMITS["crop_size"]),
    "max_crops": Option(MODEL_DEFAULTS["max_crops"], "Crop slots per sample (classes present, largest first).",
                        *SIZE_LIMITS["max_crops"]),
    "embed_dim": Option(MODEL_DEFAULTS["embed_dim"], "Width of the crop adapter's encoder.", 1),
    "prompt": Option(MODEL_DEFAULTS["prompt"], "Text prompt of every sample (the paper uses none)."),
    "lora_rank": Option(MODEL_DEFAULTS["lora_rank"], "LoRA rank.", 1),
    "lora_alpha": Option(MODEL_DEFAULTS["lora_alpha"], "LoRA alpha.", 0, above=True),
    "crop_dropout": Option(MODEL_DEFAULTS["crop_dropout"], "Share of samples trained without crops "
                                                           "(classifier-free guidance).", 0, 1),
    "map_dropout": Option(MODEL_DEFAULTS["map_dropout"], "Share of samples trained without the map.", 0, 1),
    "classes": Option(None, "Comma-separated class names the dataset must have, in index order (a guard)."),
    "logging_steps": Option(10, "Read the loss back and log it every N steps.", 1),
    "validation_steps": Option(500, "Write a validation grid every N steps; 0: only at the end.", 0),
    "validation_image": Option(None, "Class maps to validate on (PNG files of class ids, as --maps of generate), "
                                     "crops drawn from the dataset's crop bank; default: the first "
                                     "--num_validation_images samples of the validation split.", nargs="+"),
    "num_validation_images": Option(4, "Rows of the validation grid.", 1),
    "validation_inference_steps": Option(20, "Denoising steps of the validation images.", 1, 1000),
    "validation_guidance_scale": Option(GUIDANCE_SCALE, "Guidance on the crops for the validation images (the "
                                        "pipeline's guidance_scale).", 0, MAX_GUIDANCE_SCALE),
    "report_to": Option("tensorboard", "tensorboard (default), wandb (when installed), all or none."),
    "logging_dir": Option("logs", "Tracker logs under --output_dir."),
    "tracker_project_name": Option("htd", "Project name given to the trackers."),
    "dataloader_num_workers": Option(2, "DataLoader worker processes.", 0),
    "shuffle_buffer": Option(256, "Samples in the streaming shuffle buffer.", 1),
    "gradient_checkpointing": Option(False, "Recompute activations in the backward pass (less memory, slower)."),
    "enable_xformers_memory_efficient_attention": Option(
        False, "Refused, in one line: attention already runs PyTorch's scaled_dot_product_attention (SDPA, "
               "memory-efficient kernels), and the crop adapter's region-masked attention has no xformers form."),
    "torch_compile": Option(False, "torch.compile the UNet and the ControlNet."),
    "cache_latents": Option(False, "Encode the training images with the VAE once (turns flips/rotations off)."),
    "stain_jitter": Option(0.0, "Recolour each training image and its crops together: every HED stain density "
                                "scaled by 1 ± this (uniform). The crops then carry a stain the map cannot predict, "
                                "so the crop branches learn to pass each region's absolute look on. 0: off.", 0, 1),
    "stain_jitter_shift": Option(0.0, "Every HED density of that recolouring also shifted by ± this (uniform). "
                                      "0: off.", 0, 1),
    "allow_tf32": Option(True, "Allow TF32 matrix products on Ampere and later GPUs."),
    "push_to_hub": Option(False, "Push the model folder to --hub_model_id at the end."),
    "hub_model_id": Option(None, "Model repo to push to, ORG/NAME."),
    "public": Option(False, "Make the pushed repo public (default private)."),
    "training_data_name": Option(None, "Name of the training data in the model card (default: the dataset's own)."),
}
DEFAULTS = {name: option.default for name, option in OPTIONS.items()}
HELP = {name: option.help for name, option in OPTIONS.items()}


def check_numbers(args) -> None:
    """One line for the first option outside its range (NaN, inf, zero batch sizes, negative steps, ...)."""
    for name, option in OPTIONS.items():
        if option.bounded:
            check_number(f"--{name}", getattr(args, name), option.low, option.high, option.above, option.below)


def add_option(parser: argparse.ArgumentParser, name: str, option: Option) -> None:
    """`--name` as its declaration says; every flag defaults to None, so that a config file's value is kept
    unless the flag is given."""
    flag = f"--{name}"
    if option.kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=option.help)
        return
    parser.add_argument(flag, type=option.kind, choices=option.choices, nargs=option.nargs, default=None,
                        help=f"{option.help} (default: {option.default})")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an HTD model (LoRA + semantic-map ControlNet + crop adapter).")
    parser.add_argument("--config", type=config_path, help="YAML file with any of the options below (flags win), "
                        f"or the name of a config shipped with the recipe ({', '.join(packaged_configs())}).")
    for name, option in OPTIONS.items():
        add_option(parser, name, option)
    args = parser.parse_args(input_args)
    return training_args(args.config, **{k: v for k, v in vars(args).items() if v is not None and k != "config"})


def training_args(config: str | Path | None = None, **options) -> argparse.Namespace:
    """What the recipe's `main` takes, from Python: the defaults, then `config` (a YAML file or a packaged
    config's name), then `options` (flag names with underscores), as the command line would merge them."""
    config = config_path(str(config)) if config is not None else None
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown training option(s) {', '.join(unknown)}")
    merged = dict(DEFAULTS)
    if config is not None:
        merged.update(read_config(config))
    for source, other in (("dataset_name", "train_data_dir"), ("train_data_dir", "dataset_name")):
        if source in options and other not in options:  # the data source given wins over the config's
            merged[other] = None
    merged.update(options)
    if isinstance(merged["classes"], str):
        merged["classes"] = [name.strip() for name in merged["classes"].split(",")]
    if isinstance(merged["validation_image"], str):
        merged["validation_image"] = [merged["validation_image"]]
    return argparse.Namespace(config=config, **merged)


CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped beside the recipe, in the repository and the wheel


def packaged_configs() -> list[str]:
    return sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def config_path(value: str) -> Path:
    """`--config`: a YAML file given by its path (a .yaml/.yml suffix or a folder part: `./demo` is a file), or
    the bare name of a packaged config (`--config demo`), whatever the current directory holds."""
    path = Path(value)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1 or value.startswith((".", "~")):
        return path.expanduser()
    if (CONFIGS / f"{value}.yaml").is_file():
        return CONFIGS / f"{value}.yaml"
    raise UserError(f"--config {value}: no packaged config of that name ({', '.join(packaged_configs())}); "
                    f"a YAML file is given by its path: ./{value}")


def read_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read the config ({err})") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of option: value")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise UserError(f"{path}: unknown config key(s) {', '.join(unknown)}")
    return data


def check_inputs(args) -> tuple[dict, list[dict]]:
    """Everything that can be wrong with the inputs, before any model is loaded. Returns manifest and classes."""
    from htd_toolkit.data.folder import read_manifest

    check_numbers(args)
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} is not divisible by 8")
    if args.logging_steps < 1:
        raise UserError(f"--logging_steps {args.logging_steps}: log at least every N >= 1 steps")
    if args.cache_latents and (args.stain_jitter or args.stain_jitter_shift):
        raise UserError("--stain_jitter recolours pixels: it cannot be combined with --cache_latents")
    check_accelerations(args)
    if args.dataset_name:
        args.train_data_dir = hub_dataset(args)
    if not args.train_data_dir:
        raise UserError("--train_data_dir (a folder written by `htd-toolkit prepare`) or --dataset_name is required")
    manifest = read_manifest(Path(args.train_data_dir))
    if not manifest.get("splits", {}).get("train"):
        raise UserError(f"{args.train_data_dir}: the dataset has no training samples")
    classes = manifest["classes"]
    if args.classes is not None:
        check_same_names(args.classes, "the config", classes, args.train_data_dir)
    check_base(args)
    channels = len(classes) + (3 if args.crop_mode == "canvas" else 0)
    if args.controlnet_model_name_or_path:
        check_controlnet(args, channels)
    for path in args.validation_image or []:
        read_validation_map(path, len(classes))
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id ORG/NAME")
    if args.push_to_hub:  # a public repo refuses the push: say so before training, not after
        check_visibility(args.hub_model_id, "model", args.public)
    writable_folder(Path(args.output_dir), "--output_dir")
    return manifest, classes


def check_accelerations(args) -> None:
    """The memory savers of diffusers' scripts that need a package: one line when it is missing, and for
    xformers always (SDPA already runs, and the crop adapter's region-masked attention has no xformers form)."""
    import importlib.util

    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--use_8bit_adam needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    if args.enable_xformers_memory_efficient_attention:
        missing = "xformers is not installed, and not needed: " if importlib.util.find_spec("xformers") is None else ""
        raise UserError(f"--enable_xformers_memory_efficient_attention: {missing}attention already runs PyTorch's "
                        "scaled_dot_product_attention (SDPA, memory-efficient kernels), and the crop adapter's "
                        "region-masked attention has no xformers form; drop the flag")


def check_controlnet(args, channels: int) -> None:
    """--controlnet_model_name_or_path resolves to a ControlNet that takes the map's `channels` (from its config
    alone, before any weight is read)."""
    from diffusers import ControlNetModel

    name = args.controlnet_model_name_or_path
    try:
        config = ControlNetModel.load_config(name, cache_dir=args.cache_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"--controlnet_model_name_or_path {name}: no ControlNet there ({one_line(err)})") from err
    if config.get("conditioning_channels", 3) != channels:
        canvas = " and the crop canvas's 3" if args.crop_mode == "canvas" else ""
        raise UserError(f"--controlnet_model_name_or_path {name}: conditioning_channels "
                        f"{config.get('conditioning_channels', 3)}, but the map's classes{canvas} need {channels}")


def read_validation_map(path: str | Path, num_classes: int) -> np.ndarray:
    """A --validation_image: one channel of class ids below `num_classes` (or 255), one line otherwise."""
    from htd_toolkit.data.folder import check_mask
    from htd_toolkit.data.shards import one_channel, open_image

    if not Path(path).is_file():
        raise UserError(f"--validation_image {path}: no such file")
    labels = one_channel(np.asarray(open_image(Path(path), f"--validation_image {path}")), f"--validation_image {path}")
    check_mask(labels, num_classes, f"--validation_image {path}")
    return labels


def check_base(args) -> None:
    """The base resolves before any work: the toy base shipped in the package by the id its model folders record
    (`local:he_base_cc0`, which the demo config names), a local diffusers folder, or a Hub model that is cached or
    found. Anything else is one line in seconds: from_pretrained would retry an unreachable Hub for minutes."""
    from huggingface_hub import try_to_load_from_cache

    base = str(args.pretrained_model_name_or_path)
    if base == SHIPPED_BASE_ID:
        args.pretrained_model_name_or_path = base = str(shipped_base())
    if base.startswith((".", "/", "~")) or Path(base).exists():
        if not (Path(base) / "model_index.json").exists():
            raise UserError(f"{base}: base model not found (no model_index.json)")
        return
    if isinstance(try_to_load_from_cache(base, "model_index.json", cache_dir=args.cache_dir, revision=args.revision),
                  str):
        return
    problem = hub_base_problem(base, args.revision)
    if problem:
        raise UserError(f"--pretrained_model_name_or_path {base}: {problem}")


def hub_base_problem(base: str, revision: str | None) -> str | None:
    """Why `base` cannot be loaded from the Hub, from one request (no retries); None when the Hub has it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(base, revision=revision)
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 404):  # what the Hub answers for a missing repo, and for one this token cannot see
            return "not a local folder, nor a model on the Hub"
        return f"not a local folder, and the Hub answered HTTP {status}"
    except ValueError as err:  # not a valid repo id
        return f"not a local folder, nor a Hub model id ({err})"
    except Exception as err:  # the HTTP transport's own errors: no network, no DNS, HF_HUB_OFFLINE
        return (f"not a local folder, and the Hub cannot be reached ({type(err).__name__}); give a diffusers folder, "
                f"or {SHIPPED_BASE_ID} for the toy base shipped in the package")
    return None


def hub_dataset(args) -> str:
    """A local copy of a prepared dataset repo, as plain files (the Hub cache's symlinks would not pass the
    dataset folder's checks) in the htd-toolkit cache; a second run downloads only what changed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    from htd_toolkit.config import cache_dir

    if args.train_data_dir:
        raise UserError("give --train_data_dir or --dataset_name, not both")
    try:
        revision = checked_revision(args.dataset_name, "dataset", args.dataset_revision)
        folder = cache_dir() / "hub-datasets" / args.dataset_name.replace("/", "--") / (args.dataset_revision or "main")
        return snapshot_download(args.dataset_name, repo_type="dataset", revision=revision, local_dir=folder)
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise UserError(f"--dataset_name {args.dataset_name}: no such dataset repo or revision on the Hub "
                        "(a private one needs HF_TOKEN or `hf auth login`)") from err
    except (HfHubHTTPError, OSError) as err:
        raise UserError(f"--dataset_name {args.dataset_name}: download failed ({type(err).__name__})") from err


def htd_config(args, classes: list[dict], manifest: dict) -> HTDConfig:
    base = str(args.pretrained_model_name_or_path)
    local = Path(base).exists()
    return HTDConfig(
        base_model=f"local:{Path(base).name}" if local else base, base_revision=None if local else args.revision,
        classes=classes, mpp=manifest.get("config", {}).get("mpp"),
        **{name: getattr(args, name) for name in MODEL_OPTIONS},
        training_data=args.training_data_name or args.dataset_name or manifest.get("source", {}).get("name"),
        glass_rgb=training_glass(args.train_data_dir), class_fingerprint=manifest.get(FINGERPRINT))


def training_glass(folder: str | Path, samples: int = 512) -> list[int] | None:
    """The glass colour of the training data's background (the median of its glass-looking class-0 pixels in
    the first `samples` training samples): the flat fallback when a model has no glass bank. None when it
    has no glass."""
    from htd_toolkit.evaluate.sets import load_set
    from htd_toolkit.models.background import glass_colour

    train = load_set(Path(folder), "train", limit=samples)
    colour = glass_colour(train.images, train.masks)
    return list(colour) if colour else None


def training_glass_bank(folder: str | Path, samples: int = 512) -> GlassBank | None:
    """Tiles of the training data's real glass (`GlassBank.from_images` over the first `samples` training
    samples), saved in the model folder: what generation keeps class 0. None when it has no glass."""
    from htd_toolkit.evaluate.sets import load_set

    train = load_set(Path(folder), "train", limit=samples)
    bank = GlassBank.from_images(train.images, train.masks)
    if bank is None:
        logger.warning("%s: no 16-px background cell of the training data is glass throughout (%d %% of its "
                       "pixels by the glass rule): no glass bank; --keep-glass keeps class 0 the flat colour of its "
                       "glass pixels, if any", folder, round(GLASS_TILE_MIN_SHARE * 100))
    return bank


def numbered_dirs(output_dir: Path) -> list[Path]:
    """Every `checkpoint-N/` folder, by N."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def is_complete(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds every file resuming reads (a folder this recipe did not write, e.g. an empty or
    half-copied one, does not)."""
    from accelerate.utils import OPTIMIZER_NAME, SCHEDULER_NAME

    return all((checkpoint / name).is_file() for name in
               (TRAINABLE_WEIGHTS, f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin", CONFIG_NAME))


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first."""
    return [path for path in numbered_dirs(output_dir) if is_complete(path)]


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (main process only)."""
    if not limit:
        return
    existing = checkpoint_dirs(output_dir)
    for old in existing[:max(0, len(existing) - limit)]:
        shutil.rmtree(old)


def save_final_model(output_dir: Path, write) -> None:
    """`write(folder)` into `final.partial/`, then each entry moved into `output_dir`, htd_config.json last
    (removed first): a run killed while saving leaves no half-written file under a final name and no folder
    that loads as a model; running again with --resume_from_checkpoint latest saves it again."""
    staging = output_dir / "final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    (output_dir / CONFIG_NAME).unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == CONFIG_NAME):
        target = output_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        entry.replace(target)
    staging.rmdir()


def stop_if_diverged(accelerator, nonfinite: torch.Tensor, step: int, output_dir: Path) -> None:
    """Stop, saving nothing more, once a loss or gradient norm has been NaN or infinite (checked at every
    logging step and before every checkpoint and the final save, so no saved weights are NaN)."""
    if not accelerator.gather(nonfinite[None]).any().item():
        return
    latest = checkpoint_dirs(output_dir)
    kept = f"the last good checkpoint ({latest[-1].name}) is kept" if latest else "no checkpoint was saved"
    raise UserError(f"the training loss became NaN or infinite by step {step}: stopped; {kept}. "
                    "Lower --learning_rate / --lora_learning_rate or use --mixed_precision bf16 instead of fp16")


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None) -> Path:
    """`checkpoint-STEP/`, written as `checkpoint-STEP.partial/` and renamed when complete; older ones are
    pruned only then. A run killed while saving leaves the last complete checkpoint as `latest`."""
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def resume_path(args, output_dir: Path) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        existing = checkpoint_dirs(output_dir)
        incomplete = [path.name for path in numbered_dirs(output_dir) if path not in existing]
        if incomplete:
            logger.warning("%s: not complete checkpoints (no training state the recipe wrote), left as they are; "
                           "latest is %s", ", ".join(incomplete), existing[-1].name if existing else "none")
        return existing[-1] if existing else None
    path = Path(args.resume_from_checkpoint)
    path = path if path.is_absolute() or path.exists() else output_dir / path
    if not path.exists():
        raise UserError(f"{args.resume_from_checkpoint}: checkpoint not found")
    return path


def validation_conditions(args, config: HTDConfig):
    """Fixed maps and crops for validation: the --validation_image maps with crops from the dataset's crop
    bank (drawn with --seed), else the first samples of the validation split (else train)."""
    from htd_toolkit.models.training_data import TrainingStream

    if args.validation_image:
        return validation_map_items(args, config)
    for split in ("validation", "train"):
        try:
            stream = TrainingStream(args.train_data_dir, config.resolution, config.max_crops, config.crop_size,
                                    config.crop_mode, split=split, seed=args.seed, shuffle_buffer=1, augment=False)
        except UserError:
            continue
        return [item for _, item in zip(range(args.num_validation_images), stream, strict=False)]
    return []


def validation_map_items(args, config: HTDConfig) -> list[dict]:
    """One validation item per --validation_image (resized to the resolution, as generate does), no real image."""
    from htd_toolkit.data.labels import classes_present
    from htd_toolkit.data.sources import crop_bank_for
    from htd_toolkit.models.conditioning import conditioning_for
    from htd_toolkit.seeding import derive_seed

    bank = crop_bank_for(config.crop_mode, Path(args.train_data_dir))
    items = []
    for index, path in enumerate(args.validation_image):
        labels = read_validation_map(path, config.num_classes)
        if labels.shape != (config.resolution, config.resolution):
            labels = np.asarray(Image.fromarray(labels).resize((config.resolution,) * 2, Image.Resampling.NEAREST))
        crops = {} if bank is None else bank.draw_crops(classes_present(labels, config.max_crops), np.random.default_rng(
            derive_seed(args.seed, "validation", index)), {})[0]
        cond = conditioning_for(labels, crops, config.crop_mode, config.max_crops, config.crop_size)
        items.append({"__key__": str(path), "conditioning": cond, "pixel_values": None})
    return items


def validation_grid(items: list[dict], images: np.ndarray, config: HTDConfig) -> np.ndarray:
    """Rows of map | crops | generated | real, as uint8 HWC."""
    from htd_toolkit.publish.figures import crop_strip

    specs = class_specs(config.classes)
    size = config.resolution
    rows = []
    for item, image in zip(items, images, strict=True):
        cond = item["conditioning"]
        labels = cond.class_map.numpy().astype(np.uint8)
        pixels = item["pixel_values"]
        real = (np.full((size, size, 3), 255, np.uint8) if pixels is None else  # a --validation_image has none
                ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
        crops = crop_strip(cond.crops, cond.crop_classes, size)
        rows.append(np.concatenate([colorize(labels, specs), crops, image, real], axis=1))
    return np.concatenate(rows, axis=0)


def log_validation(accelerator, model, config: HTDConfig, items: list[dict], step: int, args, output_dir: Path):
    if not items:
        return None
    from htd_toolkit.models.conditioning import Conditioning

    inner = accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    pipe = HTDPipeline.from_model(inner)
    pipe.set_progress_bar_config(disable=True)
    cond = Conditioning.stack([item["conditioning"] for item in items])
    with accelerator.autocast():
        images = pipe(conditioning=cond, generator=pipe.seeded(range(len(items))), output_type="np",
                      num_inference_steps=args.validation_inference_steps,
                      guidance_scale=args.validation_guidance_scale).images
    inner.train(was_training)
    grid = validation_grid(items, images, config)
    folder = output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation (map | crops | generated | real)", grid, step, dataformats="HWC")
    return path


def main(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from htd_toolkit.models.training_data import TrainingStream, collate_samples

    manifest, classes = check_inputs(args)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=cpu_only(), gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    config = htd_config(args, classes, manifest)
    base = args.pretrained_model_name_or_path
    model = HTDModel.from_base(config, base, seed=args.seed, cache_dir=args.cache_dir, variant=args.variant)
    model.glass_bank = training_glass_bank(args.train_data_dir)
    if args.controlnet_model_name_or_path:  # fine-tune an existing ControlNet instead of a copy of the UNet
        model.controlnet = load_controlnet(args)
        model.set_trainable()
    embed = base if Path(base).exists() and folder_size(Path(base)) < EMBED_BASE_MAX_BYTES else None
    if config.base_model == SHIPPED_BASE_ID:  # every installation has it: no copy
        embed = None
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.controlnet.enable_gradient_checkpointing()
    prepare_for_training(model, accelerator.device, accelerator.mixed_precision)
    if args.torch_compile:  # in place: parameter names, checkpoints and the saved folder stay the same
        keep_compiled_kernels()
        model.unet.compile()
        model.controlnet.compile()
    noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
    latents = latent_cache(accelerator, model, args, config) if args.cache_latents else None
    dataset = TrainingStream(args.train_data_dir, config.resolution, config.max_crops, config.crop_size,
                             config.crop_mode, seed=args.seed, shuffle_buffer=args.shuffle_buffer,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, latents=latents,
                             stain_jitter=(args.stain_jitter, args.stain_jitter_shift),
                             batch_size=args.train_batch_size, max_samples=args.max_train_samples)
    if len(dataset) == 0:
        raise UserError(f"{args.train_data_dir}: fewer training samples than processes")
    workers = args.dataloader_num_workers
    loader = DataLoader(dataset, batch_size=args.train_batch_size, num_workers=workers, collate_fn=collate_samples,
                        persistent_workers=False, pin_memory=torch.cuda.is_available())
    batches_per_epoch = dataset.batches_per_epoch(args.train_batch_size, workers)
    if args.num_train_epochs:  # as diffusers' examples: optimizer steps = epochs x update steps per epoch
        args.max_train_steps = args.num_train_epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    scale = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes if args.scale_lr else 1
    optimizer = make_optimizer(model, args.learning_rate * scale, args.lora_learning_rate * scale,
                               args.adam_weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_epsilon,
                               eight_bit=args.use_8bit_adam)
    # accelerate steps a prepared schedule once per process at every optimizer step: counted in process
    # steps, as diffusers' examples do, the schedule is the same on any number of processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    def save_hook(models, weights, checkpoint_dir):
        """The trainable tensors by name (what resuming reads) and, beside them, the model folder, so
        `HTDPipeline.from_pretrained(checkpoint-N)` (and generate, evaluate, push) can use any checkpoint."""
        for wrapped in models:
            inner = accelerator.unwrap_model(wrapped)
            if accelerator.is_main_process:
                state = {n: p.detach().cpu().contiguous() for n, p in inner.named_parameters() if p.requires_grad}
                save_file(state, Path(checkpoint_dir) / TRAINABLE_WEIGHTS)
                inner.save_pretrained(checkpoint_dir, embed_base=embed)
                name = Path(checkpoint_dir).name.removesuffix(".partial")
                write_model_card(Path(checkpoint_dir), config, manifest, args,
                                 repo_id=f"{Path(args.output_dir).name}/{name}")
        while weights:
            weights.pop()

    def load_hook(models, checkpoint_dir):
        while models:
            inner = accelerator.unwrap_model(models.pop())
            state = load_file(Path(checkpoint_dir) / TRAINABLE_WEIGHTS)
            params = dict(inner.named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in state]
            if missing:
                raise UserError(f"{checkpoint_dir}: checkpoint lacks {len(missing)} trainable tensors "
                                f"(e.g. {missing[0]}); was it written with another --crop_mode?")
            with torch.no_grad():
                for name, value in state.items():
                    params[name].copy_(value)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step = 0
    checkpoint = resume_path(args, output_dir)
    if checkpoint is not None:
        check_same_classes(HTDConfig.load(checkpoint).class_fingerprint, str(checkpoint), config.class_fingerprint,
                           str(args.train_data_dir))
        accelerator.load_state(str(checkpoint))
        global_step = int(checkpoint.name.split("-")[-1])
        logger.info("resumed from %s at step %d", checkpoint, global_step)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config={k: v for k, v in vars(args).items()
                                                 if isinstance(v, (int, float, str, bool))})
    validation_items = validation_conditions(args, config) if args.validation_steps else []

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    consumed = global_step * args.gradient_accumulation_steps
    seen_keys: set[str] = set()  # this process's share, reported at the end
    model.train()
    loss_sum, loss_steps = torch.zeros((), device=accelerator.device), 0  # read back every logging_steps only
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # a NaN/inf loss or gradient norm
    while global_step < args.max_train_steps:
        epoch, skip = divmod(consumed, batches_per_epoch)
        dataset.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index < skip:
                continue
            generators = sample_generators(args.seed, consumed, batch["__key__"])
            seen_keys.update(batch["__key__"])
            batch = batch_to_device(batch, accelerator.device)
            with accelerator.accumulate(model):
                loss = training_loss(model, noise_scheduler, batch, generators, config)
                accelerator.backward(loss)
                nonfinite |= ~torch.isfinite(loss.detach())
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                       args.max_grad_norm)
                    if norm is not None:  # None under DeepSpeed, which checks for overflow itself
                        nonfinite |= ~torch.isfinite(norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)
            consumed += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            loss_sum, loss_steps = loss_sum + loss.detach().float(), loss_steps + 1
            checkpoint_now = args.checkpointing_steps and global_step % args.checkpointing_steps == 0
            if checkpoint_now or global_step % args.logging_steps == 0 or global_step >= args.max_train_steps:
                stop_if_diverged(accelerator, nonfinite, global_step, output_dir)
            if global_step % args.logging_steps == 0 or global_step >= args.max_train_steps:
                loss_value = accelerator.gather((loss_sum / loss_steps)[None]).mean().item()
                progress.set_postfix(loss=f"{loss_value:.4f}")
                accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                loss_sum, loss_steps = torch.zeros_like(loss_sum), 0
            if checkpoint_now:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    log_validation(accelerator, model, config, validation_items, global_step, args, output_dir)
                accelerator.wait_for_everyone()
            if global_step >= args.max_train_steps:
                break
        else:
            continue
        break

    logger.info("process %d of %d trained on %d distinct samples (keys %s)", accelerator.process_index,
                accelerator.num_processes, len(seen_keys), hashlib.sha256(" ".join(sorted(seen_keys)).encode()).hexdigest()[:12])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        done = args.validation_steps and global_step % args.validation_steps == 0
        final_grid = (output_dir / "validation" / f"step-{global_step:06d}.png" if done else
                      log_validation(accelerator, model, config, validation_items, global_step, args, output_dir))
        final_grid = final_grid if final_grid is not None and final_grid.exists() else None
        inner = accelerator.unwrap_model(model)

        save_final_model(output_dir, lambda folder: (inner.save_pretrained(folder, embed_base=embed),
                                                     write_model_card(folder, config, manifest, args, final_grid)))
        if args.push_to_hub:
            from htd_toolkit.publish.hub import push_model

            url = push_model(output_dir, args.hub_model_id, private=not args.public)
            logger.info("pushed the model to %s", url)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def load_controlnet(args):
    """The ControlNet of --controlnet_model_name_or_path (its channels were checked with the inputs)."""
    from diffusers import ControlNetModel

    try:
        return ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, cache_dir=args.cache_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path}: cannot load the "
                        f"ControlNet ({one_line(err)})") from err


def latent_cache(accelerator, model, args, config: HTDConfig, batch_size: int = 16) -> dict:
    """VAE latents of every training image at the training resolution, computed once (main process)
    into OUTPUT/latents-cache/, keyed by the base, the resolution and the shards' sha256s."""
    from safetensors.torch import load_file, save_file

    from htd_toolkit.data.folder import read_manifest
    from htd_toolkit.models.training_data import TrainingStream

    manifest = read_manifest(Path(args.train_data_dir))
    fingerprint = hashlib.sha256(json.dumps([config.base_model, config.base_revision, config.resolution,
                                             [s["sha256"] for s in manifest["shards"]]]).encode()).hexdigest()[:16]
    path = Path(args.output_dir) / "latents-cache" / f"{fingerprint}.safetensors"
    if accelerator.is_main_process and not path.exists():
        stream = TrainingStream(args.train_data_dir, config.resolution, config.max_crops, config.crop_size, "none",
                                shuffle_buffer=1, augment=False)
        items, cache = iter(stream), {}
        while chunk := list(islice(items, batch_size)):
            pixels = torch.stack([item["pixel_values"] for item in chunk]).to(accelerator.device)
            with torch.no_grad():
                encoded = model.encode_images(pixels).float().cpu()
            cache.update(zip([item["__key__"] for item in chunk], encoded, strict=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in cache.items()}, partial)
        partial.replace(path)
    accelerator.wait_for_everyone()
    return load_file(path)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cli(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: out of GPU memory at --train_batch_size {args.train_batch_size}: lower it (raise "
              "--gradient_accumulation_steps to keep the effective batch) or add --gradient_checkpointing; "
              "--resume_from_checkpoint latest continues from the last checkpoint", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
