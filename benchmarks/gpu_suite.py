"""One call that checks and measures everything GPU-side, ours beside stock diffusers, in one run.

Checks: bf16 generation close to fp32 (same model, same seeds); a training step finite and learning
(loss falls on a fixed batch). Measures: `htd-toolkit generate` vs the stock ControlNet pipeline with 3
masked IP-Adapter crops (benchmarks/generate.py), and the recipe's training step vs a plain diffusers
LoRA + ControlNet step (benchmarks/train.py). Prints a table and writes `gpu_suite.json` to $OUT.

    python benchmarks/gpu_suite.py --shape toy                     # CPU, a minute: proves it runs
    python benchmarks/gpu_suite.py --shape sd15 --gen-batch 32 --gen-images 128 --train-batch 8 [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment() -> dict:
    import diffusers

    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": "cpu"}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    driver=_driver_version(), memory_GiB=round(torch.cuda.get_device_properties(0).total_memory / 2**30))
    return info


def _driver_version() -> str | None:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check_bf16_generation(shape_name: str, steps: int = 10) -> dict:
    """The same random-weight model and seeds in fp32 and bf16: images must stay close."""
    from htd_toolkit.models.pipeline import HTDPipeline

    gen = load("generate")
    shape = gen.SHAPES[shape_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = gen.write_base(root / "base", shape)
        maps = gen.prepare_maps(root / "prep", shape)
        model = gen.write_model(root, base, maps, shape)
        from htd_toolkit.generate.bundle import conditions_for
        from htd_toolkit.generate.sources import CropBank, load_maps

        entries, _ = load_maps(maps)
        bank = CropBank(maps / "crop_bank")
        images = {}
        for dtype in (torch.float32, torch.bfloat16):
            pipe = HTDPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
            items = [conditions_for(i, 0, entries, bank, pipe.config, {}) for i in range(2)]
            cond = pipe.conditioning([it[1] for it in items], [it[2] for it in items])
            images[dtype] = pipe(cond, seeds=[1, 2], num_inference_steps=steps, guidance_scale=2.0).astype(float)
    diff = float(np.abs(images[torch.float32] - images[torch.bfloat16]).mean())
    return {"check": "bf16 generation close to fp32", "mean_abs_pixel_diff": diff, "ok": bool(diff < 12.0)}


def check_training_learns(shape_name: str, steps: int = 15) -> dict:
    """The recipe's step on a fixed batch, under bf16 autocast on GPU: finite, and the loss falls."""
    from htd_toolkit.models.training import step_generator, training_loss

    bench = load("train")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, optimizer, scheduler, data, config = bench.build_training(bench.SHAPES[shape_name], 2, device, 0.0)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * 10  # a few steps must show learning
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = training_loss(model, scheduler, data, step_generator(0, 0), config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    finite = all(np.isfinite(losses))
    return {"check": "training step finite and learning", "first_loss": losses[0], "last_loss": losses[-1],
            "ok": bool(finite and np.mean(losses[-3:]) < np.mean(losses[:3]))}


def embedding_throughput(shape_name: str, tiles: int = 512, batch: int = 128) -> dict:
    """Tiles/s of the encoder registry's batched path (bf16 on GPU) against a plain per-batch fp32 timm
    forward with torchvision's transform, on the UNI architecture (random weights) or a tiny ViT (toy)."""
    import timm
    from torchvision import transforms

    from htd_toolkit.clustering.encoders import get_encoder

    arch = "vit_large_patch16_224" if shape_name == "sd15" else "vit_tiny_patch16_224"
    tiles = tiles if shape_name == "sd15" else 64
    images = np.random.default_rng(0).integers(0, 255, (tiles, 224, 224, 3), dtype=np.uint8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = timm.create_model(arch, pretrained=False, num_classes=0).to(device).eval()
    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def stock():
        with torch.no_grad():
            for start in range(0, tiles, batch):
                x = torch.stack([transform(i) for i in images[start:start + batch]]).to(device)
                plain(x).cpu()

    ours = get_encoder(f"timm:{arch}")
    timings = {}
    for name, fn in (("stock", stock), ("ours", lambda: ours(images, batch_size=batch))):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
    return {"workload": f"embed ({arch})", "batch": batch, "stock_tiles_per_s": tiles / timings["stock"],
            "ours_tiles_per_s": tiles / timings["ours"], "ratio": timings["stock"] / timings["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["toy", "sd15"], default="toy")
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-images", type=int, default=8)
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time compiled generation and training steps")
    parser.add_argument("--skip", nargs="*", default=[], choices=["checks", "generate", "train", "embed"])
    args = parser.parse_args()
    report = {"environment": environment(), "checks": [], "rows": []}
    print(json.dumps(report["environment"]), flush=True)
    if "checks" not in args.skip:
        for check in (check_bf16_generation, check_training_learns):
            result = check(args.shape)
            report["checks"].append(result)
            print(json.dumps(result), flush=True)
    if "generate" not in args.skip:
        row = load("generate").run(args.shape, args.gen_batch, args.gen_images, args.gen_steps, 7.5)
        report["rows"].append({"workload": "generate", **row})
        if args.compile:
            row = load("generate").run(args.shape, args.gen_batch, args.gen_images, args.gen_steps, 7.5, True)
            report["rows"].append({"workload": "generate (compiled, compile time included)", **row})
    if "train" not in args.skip:
        row = load("train").run(args.shape, args.train_batch, False, reps=5)
        report["rows"].append({"workload": "train", **row})
        if args.compile:
            row = load("train").run(args.shape, args.train_batch, True, reps=5)
            report["rows"].append({"workload": "train (compiled)", **row})
    if "embed" not in args.skip:
        report["rows"].append(embedding_throughput(args.shape))
    print("\n| workload | batch | stock | ours | ratio |\n|---|---|---|---|---|")
    for row in report["rows"]:
        unit = next(u for u in ("images", "samples", "tiles") if any(k.endswith(f"{u}_per_s") for k in row))
        stock = next(v for k, v in row.items() if k.endswith(f"{unit}_per_s") and not k.startswith("ours"))
        ours = row[f"ours_{unit}_per_s"]
        unit += "/s"
        print(f"| {row['workload']} | {row['batch']} | {stock:.2f} {unit} | {ours:.2f} {unit} | {row['ratio']:.2f}x |")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_suite.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
