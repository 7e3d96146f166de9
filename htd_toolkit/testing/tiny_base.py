"""Tiny, randomly initialised Stable Diffusion bases built from configs (no downloads).

The folder this writes is a complete diffusers-format SD pipeline (unet, vae with scale factor 8,
text_encoder, tokenizer, scheduler, model_index.json), so everything downstream loads it through the
same `from_pretrained` path a Hub id takes. Two layouts:

- ``min``: 2 UNet blocks, the smallest that works (about 0.5 MiB on disk);
- ``sd15``: SD1.5's block types and order (3 cross-attention down blocks), so code that counts
  attention layers or LoRA / IP-Adapter keys sees what it would see on SD1.5.

    python -m htd_toolkit.testing.tiny_base --out DIR [--layout min|sd15] [--overwrite]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from htd_toolkit.base.components import SCHEDULER, TEXT_ENCODER, build_tokenizer
from htd_toolkit.errors import UserError

if TYPE_CHECKING:
    from diffusers import ControlNetModel, StableDiffusionPipeline

LAYOUTS = ("min", "sd15")
BASE_ENTRIES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")  # what save_pretrained writes
UNET_COMMON = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
                   attention_head_dim=2, norm_num_groups=4)
UNET_BLOCKS = {
    "min": dict(block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    "sd15": dict(block_out_channels=[8, 8, 16, 16], down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
           block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4)
# Stable Diffusion 1.5's own UNet and VAE architecture (860 M and 84 M parameters), for the benchmarks'
# random-weight models at full size.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
# 4 entries: the conditioning embedding must downsample by 2**3 = the VAE scale factor.
CONTROLNET_EMBEDDING_CHANNELS = (8, 8, 16, 16)


def build_tiny_pipeline(layout: str = "min", seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised StableDiffusionPipeline with tiny components; same seed, same weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_COMMON, **UNET_BLOCKS[layout])
    vae = AutoencoderKL(**VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler.from_config(SCHEDULER), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def tiny_controlnet(unet, conditioning_channels: int = 3) -> ControlNetModel:
    """`ControlNetModel.from_unet` with a conditioning embedding small enough for the tiny base."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels,
                                     conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS)


def write_tiny_base(out: str | Path, layout: str = "min", overwrite: bool = False, seed: int = 0) -> Path:
    """Save a tiny base to `out` in diffusers format. Refuses a non-empty folder unless `overwrite`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: folder is not empty; pass --overwrite to replace it")
        clear_base(out)
    build_tiny_pipeline(layout, seed).save_pretrained(out)
    return out


def clear_base(out: Path) -> None:
    """Remove what `save_pretrained` writes (model_index.json and the component folders), nothing else, and
    never in the root folder or a folder holding the current directory or the home folder."""
    from htd_toolkit.data.outputs import refuse_clearing, refuse_root

    refuse_root(out)
    refuse_clearing(out, ())
    for name in BASE_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m htd_toolkit.testing.tiny_base", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the diffusers-format base into")
    parser.add_argument("--layout", choices=LAYOUTS, default="min")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = write_tiny_base(args.out, args.layout, args.overwrite, args.seed)
    except (FileExistsError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
