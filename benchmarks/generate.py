"""Generation throughput: `htd-toolkit generate` against stock `StableDiffusionControlNetPipeline`.

Same random-weight base, same shapes, steps, guidance and batch, both writing their images and masks
to WebDataset tars. Stock = the pipeline with 3 region-masked IP-Adapter crops (the stock form of the
`adapter` crop mode, as shared/bench/sd15_ipadapter.py), encoding and writing after each batch.
Ours = the whole `generate` command: maps and crop bank from a prepared folder, the region-masked
crop adapter, ControlNet residuals shared by both CFG halves, a background shard writer.

    python benchmarks/generate.py --shape toy            # CPU, about a minute
    python benchmarks/generate.py --shape sd15 --batch 32 --images 128   # GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "toy": dict(resolution=64, patch=128, mpp=2.0, layout="sd15", crop_size=32, embed_dim=32, lora=4),
    "sd15": dict(resolution=512, patch=512, mpp=1.0, layout=None, crop_size=64, embed_dim=256, lora=16),
}
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)


def write_base(folder: Path, shape: dict) -> Path:
    """A random-weight base: the tiny one for toy shapes, SD1.5's architecture otherwise."""
    from htd_toolkit.testing.tiny_base import build_tiny_pipeline, write_tiny_base

    if shape["layout"]:
        return write_tiny_base(folder, layout=shape["layout"], overwrite=True)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = build_tiny_pipeline("min")
    pipe.unet = UNet2DConditionModel(**SD15_UNET)
    pipe.vae = AutoencoderKL(**SD15_VAE)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=516, hidden_size=768, intermediate_size=3072,
                                                     num_hidden_layers=1, num_attention_heads=12,
                                                     max_position_embeddings=77, bos_token_id=514, eos_token_id=515,
                                                     pad_token_id=515))
    pipe.save_pretrained(folder)
    return folder


def prepare_maps(root: Path, shape: dict) -> Path:
    from htd_toolkit.cli import main
    from htd_toolkit.wsi.pyramid import write_slide_region
    from htd_toolkit.wsi.sample_slide import sample_slide_path

    (root / "slides").mkdir(parents=True)
    (root / "ann").mkdir()
    write_slide_region(sample_slide_path(), root / "slides" / "cc0.tif")
    from htd_toolkit.demo import TUMOUR_XML

    (root / "ann" / "cc0.xml").write_text(TUMOUR_XML)
    code = main(["prepare", "annotated", "--slides", str(root / "slides"), "--annotations", str(root / "ann"),
                 "--format", "camelyon16", "--out", str(root / "data"), "--mpp", str(shape["mpp"]), "--patch-size",
                 str(shape["patch"]), "--stride", str(shape["patch"] // 4), "--split", "1,0,0"])
    if code:
        raise SystemExit("prepare failed")
    return root / "data"


def write_model(root: Path, base: Path, maps: Path, shape: dict) -> Path:
    from htd_toolkit.models.htd import HTDConfig, HTDModel

    classes = json.loads((maps / "manifest.json").read_text())["classes"]
    config = HTDConfig(base_model="local:random", classes=classes, resolution=shape["resolution"],
                       crop_mode="adapter", crop_size=shape["crop_size"], max_crops=3, embed_dim=shape["embed_dim"],
                       lora_rank=shape["lora"], lora_alpha=shape["lora"])
    return HTDModel.from_base(config, base).save_pretrained(root / "model", embed_base=base)


def run_ours(model: Path, maps: Path, out: Path, images: int, batch: int, steps: int, guidance: float,
             compile_: bool = False) -> float:
    from htd_toolkit.cli import main

    args = ["generate", "--model", str(model), "--maps", str(maps), "--crop-bank", str(maps / "crop_bank"),
            "--num-samples", str(images), "--out", str(out), "--batch-size", str(batch), "--steps", str(steps),
            "--guidance", str(guidance), "--shard-size", str(batch * 4), *(["--compile"] if compile_ else [])]
    start = time.perf_counter()
    if main(args):
        raise SystemExit("generate failed")
    return time.perf_counter() - start


def run_stock(base: Path, maps: Path, out: Path, images: int, batch: int, steps: int, guidance: float,
              shape: dict) -> float:
    """Stock pipeline + masked IP-Adapter crops, then a synchronous PNG + tar write per batch."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    from htd_toolkit.data.shards import encode_json, encode_png, tar_bytes, write_atomic
    from htd_toolkit.generate.sources import load_maps
    from htd_toolkit.models.crop_adapter import initial_ip_state_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=None, safety_checker=None)
    controlnet = ControlNetModel.from_unet(pipe.unet)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, safety_checker=None)
    pipe.unet._load_ip_adapter_weights([initial_ip_state_dict(pipe.unet, shape["embed_dim"])],
                                       low_cpu_mem_usage=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    entries, _ = load_maps(maps)
    res = shape["resolution"]
    start = time.perf_counter()
    for first in range(0, images, batch):
        n = min(batch, images - first)
        labels = [np.asarray(_resize(entries[(first + i) % len(entries)].labels(), res)) for i in range(n)]
        onehot = torch.stack([torch.nn.functional.one_hot(torch.from_numpy(m.astype(np.int64)), 3).permute(2, 0, 1)
                              for m in labels]).to(device, dtype)
        masks = torch.stack([torch.stack([torch.from_numpy(m == c) for c in (1, 2, 0)]) for m in labels]).float()
        prompt = torch.zeros(n, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
        embeds = torch.randn(2 * n, 3, shape["embed_dim"], device=device, dtype=dtype)
        result = pipe(prompt_embeds=prompt, negative_prompt_embeds=prompt, image=onehot, num_inference_steps=steps,
                      guidance_scale=guidance, ip_adapter_image_embeds=[embeds], output_type="np",
                      cross_attention_kwargs={"ip_adapter_masks": [torch.cat([masks, masks]).to(device, dtype)]},
                      generator=torch.Generator().manual_seed(first)).images
        pixels = (result * 255).round().astype(np.uint8)
        samples = [(f"s{first + i:08d}", [("png", encode_png(pixels[i])), ("mask.png", encode_png(labels[i])),
                                          ("json", encode_json({"i": first + i}))]) for i in range(n)]
        write_atomic(out / f"stock-{first:08d}.tar", tar_bytes(samples))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _resize(labels: np.ndarray, size: int):
    from PIL import Image

    return Image.fromarray(labels).resize((size, size), Image.Resampling.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="toy")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--compile", action="store_true", help="generate with --compile (time includes compiling)")
    args = parser.parse_args()
    print(json.dumps(run(args.shape, args.batch, args.images, args.steps, args.guidance, args.compile)))


def run(shape_name: str, batch: int, images: int, steps: int, guidance: float, compile_: bool = False) -> dict:
    shape = SHAPES[shape_name]
    with tempfile.TemporaryDirectory(prefix="htd-bench-") as tmp:
        root = Path(tmp)
        base = write_base(root / "base", shape)
        maps = prepare_maps(root / "prep", shape)
        model = write_model(root, base, maps, shape)
        (root / "stock").mkdir()
        run_stock(base, maps, root / "stock", min(images, batch), batch, 2, guidance, shape)  # warm-up
        stock = run_stock(base, maps, root / "stock", images, batch, steps, guidance, shape)
        shutil.rmtree(root / "stock")
        ours = run_ours(model, maps, root / "ours", images, batch, steps, guidance, compile_)
    row = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "shape": shape_name,
           "batch": batch, "images": images, "steps": steps, "guidance": guidance,
           "stock_images_per_s": images / stock, "ours_images_per_s": images / ours, "ratio": stock / ours,
           "compiled": compile_}
    print(f"stock StableDiffusionControlNetPipeline + masked IP-Adapter : {row['stock_images_per_s']:8.2f} images/s")
    print(f"htd-toolkit generate (model load and writer included)      : {row['ours_images_per_s']:8.2f} images/s")
    print(f"ratio                                                      : {row['ratio']:8.2f}x")
    return row


if __name__ == "__main__":
    main()
