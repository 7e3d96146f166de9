"""A model folder's files (docs/formats.md): the ones that make its images, which also identify the model,
and the card files a push publishes beside them. Torch-free: `push` and the output checks read it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from htd_toolkit.files import sha256_file

CONFIG_NAME = "htd_config.json"
# Glob patterns over relative paths; `base/` is a small local base the recipe embeds.
MODEL_FILES = (CONFIG_NAME, "id2label.json", "pytorch_lora_weights.safetensors", "glass_bank.safetensors",
               "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
               "crop_adapter/ip_adapter.safetensors", "crop_adapter/crop_encoder/config.json",
               "crop_adapter/crop_encoder/diffusion_pytorch_model.safetensors",
               "base/model_index.json", "base/*/config.json", "base/*/*.safetensors",
               "base/scheduler/scheduler_config.json", "base/tokenizer/*.json", "base/tokenizer/merges.txt",
               # the saved pipeline's layout (HTDPipeline.save_pretrained): what DiffusionPipeline.from_pretrained reads
               "model_index.json", "htd_pipeline.py", "crop_adapter/htd_crop_adapter.py", "crop_adapter/config.json",
               "crop_adapter/diffusion_pytorch_model.safetensors", "unet/config.json", "unet/*.safetensors",
               "vae/config.json", "vae/*.safetensors", "text_encoder/config.json", "text_encoder/*.safetensors",
               "scheduler/scheduler_config.json", "tokenizer/*.json", "tokenizer/merges.txt")
CARD_FILES = ("README.md", "assets/*.png")


def model_sha256(folder: Path) -> str:
    """A digest of the model files in `folder` (names and contents): a model retrained or edited in place is
    another model, whatever its folder is called."""
    digest = hashlib.sha256()
    # globbed pattern by pattern: subfolders behind symlinks are read, checkpoint-* and caches never walked
    for path in sorted({p for pattern in MODEL_FILES for p in Path(folder).glob(pattern) if p.is_file()}):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()
