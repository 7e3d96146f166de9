"""Generation throughput: `htd-toolkit generate` against stock `StableDiffusionControlNetPipeline`.

Same random-weight base, same shapes, steps, guidance and batch, both writing their images and masks
to WebDataset tars. Stock = the pipeline with 3 region-masked IP-Adapter crops (the stock form of the
`adapter` crop mode, loaded the way diffusers documents IP-Adapters), encoding and writing after each batch.
Ours = the whole `generate` command: maps and crop bank from a prepared folder, the region-masked
crop adapter, ControlNet residuals shared by both CFG halves, a background shard writer.

Throughput is images/s after the first batch (that one pays warm-up and compilation; its seconds are
reported beside). Model loading is not timed on either side.

    python benchmarks/generate.py --shape toy            # CPU, about a minute
    python benchmarks/generate.py --shape sd15 --batch 32 --images 128 [--compile]   # GPU
    python benchmarks/generate.py --shape toy --streaming --batch 1 --images 12 --steps 3   # streaming on and off

`--streaming` times `generate` alone and `generate --push-to-hub` streaming each shard to the project's local
Hub test server as it is finished (one shard per commit, the most commits), alternating, and prints their
images/s and ratio as one JSON line: the cost of uploading while generating.
"""

from __future__ import annotations

import argparse
import json
import os
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


def write_base(folder: Path, shape: dict) -> Path:
    """A random-weight base: the tiny one for toy shapes, SD1.5's architecture otherwise."""
    from htd_toolkit.testing.tiny_base import SD15_UNET, SD15_VAE, build_tiny_pipeline, write_tiny_base

    if shape["layout"]:
        return write_tiny_base(folder, layout=shape["layout"], overwrite=True)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = build_tiny_pipeline("min")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU is faster
        pipe.unet = UNet2DConditionModel(**SD15_UNET)
        pipe.vae = AutoencoderKL(**SD15_VAE)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=516, hidden_size=768, intermediate_size=3072,
                                                     num_hidden_layers=1, num_attention_heads=12,
                                                     max_position_embeddings=77, bos_token_id=514, eos_token_id=515,
                                                     pad_token_id=515))
    pipe.to(torch.bfloat16)  # random weights: half the bytes to write and read, the same speed once loaded
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
    """A random-weight HTD model; the base is not embedded (generation gets it through --base-model)."""
    from htd_toolkit.models.htd_model import HTDConfig, HTDModel

    classes = json.loads((maps / "manifest.json").read_text())["classes"]
    config = HTDConfig(base_model="local:random", classes=classes, resolution=shape["resolution"],
                       crop_mode="adapter", crop_size=shape["crop_size"], max_crops=3, embed_dim=shape["embed_dim"],
                       lora_rank=shape["lora"], lora_alpha=shape["lora"])
    return HTDModel.from_base(config, base).save_pretrained(root / "model")


def write_fixtures(root: Path, shape_name: str) -> dict[str, Path]:
    """Base, prepared maps + crop bank and model, written once and shared by every timed run."""
    shape = SHAPES[shape_name]
    base = write_base(root / "base", shape)
    maps = prepare_maps(root / "prep", shape)
    return {"base": base, "maps": maps, "model": write_model(root, base, maps, shape)}


def run_ours(fixtures: dict[str, Path], out: Path, images: int, batch: int, steps: int, guidance: float,
             compile_: bool = False, extra: tuple[str, ...] = ()):
    """The whole `generate` command; its own Throughput splits the first batch from the steady state."""
    from htd_toolkit.cli import main
    from htd_toolkit.generate.bundle import read_throughput

    maps = fixtures["maps"]
    args = ["generate", "--model", str(fixtures["model"]), "--base-model", str(fixtures["base"]), "--maps", str(maps),
            "--crop-bank", str(maps / "crop_bank"), "--num-samples", str(images), "--out", str(out), "--batch-size",
            str(batch), "--steps", str(steps), "--guidance", str(guidance), "--shard-size", str(batch * 4),
            *(["--compile"] if compile_ else []), *extra]
    if main(args):
        raise SystemExit("generate failed")
    return read_throughput(out)


def stock_pipeline(fixtures: dict[str, Path], shape: dict, compile_: bool):
    """StableDiffusionControlNetPipeline with 3 IP-Adapter crops (UNet compiled when asked, as diffusers' docs do)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    from htd_toolkit.models.crop_adapter import initial_ip_state_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = fixtures["base"]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=None, safety_checker=None)
    controlnet = ControlNetModel.from_unet(pipe.unet)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, safety_checker=None)
    pipe.unet._load_ip_adapter_weights([initial_ip_state_dict(pipe.unet, shape["embed_dim"])],
                                       low_cpu_mem_usage=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if compile_:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)
        pipe.unet, pipe.controlnet = torch.compile(pipe.unet), torch.compile(pipe.controlnet)
    return pipe


def run_stock(fixtures: dict[str, Path], out: Path, images: int, batch: int, steps: int, guidance: float,
              shape: dict, compile_: bool = False):
    """Stock pipeline + masked IP-Adapter crops, then a synchronous PNG + tar write per batch."""
    from htd_toolkit.data.shards import encode_json, encode_png, tar_bytes
    from htd_toolkit.data.sources import load_maps
    from htd_toolkit.files import write_atomic
    from htd_toolkit.generate.bundle import Throughput

    pipe = stock_pipeline(fixtures, shape, compile_)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    entries, _ = load_maps(fixtures["maps"])
    res = shape["resolution"]
    out.mkdir(parents=True, exist_ok=True)
    first_batch_s, start = 0.0, time.perf_counter()
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
        first_batch_s = first_batch_s or time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Throughput(images=images, batch_size=batch, first_batch_images=min(batch, images),
                      first_batch_s=first_batch_s, total_s=time.perf_counter() - start)


def _resize(labels: np.ndarray, size: int):
    from PIL import Image

    return Image.fromarray(labels).resize((size, size), Image.Resampling.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="toy")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16, help="per timed run; at least two batches")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--compile", action="store_true", help="also time ours torch.compile'd")
    parser.add_argument("--compile-stock", action="store_true", help="and stock compiled beside it (minutes more)")
    parser.add_argument("--streaming", action="store_true", help="time ours streaming to a local Hub, and without")
    parser.add_argument("--repeats", type=int, default=2, help="--streaming: runs of each, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="htd-bench-") as tmp:
        fixtures = write_fixtures(Path(tmp), args.shape)
        if args.streaming:
            print(json.dumps(streaming_cost(fixtures, args.shape, args.batch, args.images, args.steps, args.guidance,
                                            args.repeats)))
            return
        eager = run(fixtures, args.shape, args.batch, args.images, args.steps, args.guidance)
        print(json.dumps(eager))
        if args.compile:
            compiled = run(fixtures, args.shape, args.batch, args.images, args.steps, args.guidance, True,
                           args.compile_stock, None if args.compile_stock else eager)
            print(json.dumps(compiled))


def run(fixtures: dict[str, Path], shape_name: str, batch: int, images: int, steps: int, guidance: float,
        compile_: bool = False, compile_stock: bool = False, stock_row: dict | None = None) -> dict:
    """Stock then ours on the same fixtures; images/s after the first batch, first-batch seconds beside.

    `compile_` compiles ours; `compile_stock` the stock pipeline too (its compiled figure on an H200 is in
    docs/performance.md, when the minutes of compiling it again are better spent elsewhere).
    `stock_row`, an earlier row of this run with the same stock set-up, is reused instead of timing stock again.
    """
    if images < 2 * batch:
        raise SystemExit("--images must cover at least two batches: the first one is timed apart")
    shape = SHAPES[shape_name]
    root = fixtures["model"].parent
    if stock_row is None:
        timing = run_stock(fixtures, root / "stock", images, batch, steps, guidance, shape, compile_stock)
        shutil.rmtree(root / "stock")
        stock_row = {"stock_images_per_s": timing.steady_images_per_s, "stock_first_batch_s": timing.first_batch_s,
                     "stock_peak_GiB": _peak_memory_gib()}
    _peak_memory_gib()  # reset: ours is measured on its own
    ours = run_ours(fixtures, root / "ours", images, batch, steps, guidance, compile_)
    shutil.rmtree(root / "ours")
    stock = stock_row["stock_images_per_s"]
    row = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "shape": shape_name,
           "batch": batch, "images": images, "steps": steps, "guidance": guidance, "compiled": compile_,
           "stock_compiled": compile_stock, "stock_images_per_s": stock, "ours_images_per_s": ours.steady_images_per_s,
           "ratio": ours.steady_images_per_s / stock, "stock_first_batch_s": stock_row["stock_first_batch_s"],
           "ours_first_batch_s": ours.first_batch_s, "stock_peak_GiB": stock_row["stock_peak_GiB"],
           "ours_peak_GiB": _peak_memory_gib()}
    label = {False: "eager", True: "compiled"}
    print(f"stock StableDiffusionControlNetPipeline + masked IP-Adapter, {label[compile_stock]:8}: "
          f"{stock:8.2f} images/s (first batch {row['stock_first_batch_s']:.1f} s)")
    print(f"htd-toolkit generate (shard writer included), {label[compile_]:8}:               "
          f"{ours.steady_images_per_s:8.2f} images/s (first batch {ours.first_batch_s:.1f} s)")
    print(f"ratio: {row['ratio']:.2f}x", flush=True)
    return row


def streaming_cost(fixtures: dict[str, Path], shape_name: str, batch: int, images: int, steps: int, guidance: float,
                   repeats: int = 2) -> dict:
    """Steady images/s of `generate` without and with `--push-to-hub` streaming to a local Hub test server
    (best of `repeats` alternating runs each), and their ratio."""
    from huggingface_hub import constants

    from htd_toolkit.testing import hubserver

    root = fixtures["model"].parent
    server = hubserver.serve(root / "hub")
    settings = {"HF_TOKEN": hubserver.USER_TOKEN, "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved, endpoint = {name: os.environ.get(name) for name in settings}, constants.ENDPOINT
    os.environ.update(settings)
    xet, constants.HF_HUB_DISABLE_XET = constants.HF_HUB_DISABLE_XET, True  # read at import: the server has no Xet
    hubserver.point_clients_at(server.url)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for repeat in range(repeats):
            for mode in ("off", "on"):
                extra = ("--push-to-hub", f"user/bench-{repeat}", "--commit-every", "1") if mode == "on" else ()
                rates[mode].append(run_ours(fixtures, root / mode, images, batch, steps, guidance,
                                            extra=extra).steady_images_per_s)
                shutil.rmtree(root / mode)
    finally:  # the clients pointed back where they were (a test session's own server)
        server.shutdown()
        hubserver.point_clients_at(endpoint)
        constants.HF_HUB_DISABLE_XET = xet
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    off, on = max(rates["off"]), max(rates["on"])
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "shape": shape_name,
            "batch": batch, "images": images, "steps": steps, "shard_size": batch * 4,
            "streaming_off_images_per_s": off, "streaming_on_images_per_s": on, "ratio": on / off,
            "runs": rates}


def _peak_memory_gib() -> float | None:
    """Peak GPU memory since the last call (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


if __name__ == "__main__":
    main()
