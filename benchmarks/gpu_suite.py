"""One call that checks and measures everything GPU-side, ours beside stock diffusers, in one run.

Checks: bf16 generation close to fp32 (same model, same seeds); a training step finite and learning
(loss falls on a fixed batch); recipe, generate, evaluate and prepare unannotated end to end on the
device at toy sizes (tiny base). Measures: `htd-toolkit generate` vs the stock ControlNet pipeline with 3
masked IP-Adapter crops (benchmarks/generate.py), and the recipe's training step vs a plain diffusers
LoRA + ControlNet step (benchmarks/train.py). Prints a table; after each part it rewrites
`gpu_suite.json` and `gpu_suite.md` in $OUT, so a run stopped at its time limit keeps what it measured.
`--fidelity gpu256` adds, last, HTD's ablation at 256 px (benchmarks/fidelity.py: a base pretrained on
the device, the `none` and `adapter` fine-tunes, generation and scores; table, figure, JSON in $OUT/fidelity).

    python benchmarks/gpu_suite.py --shape toy                     # CPU, a minute: proves it runs
    python benchmarks/gpu_suite.py --shape sd15 --gen-batch 32 --gen-images 96 --train-batch 8 [--compile]
    python benchmarks/gpu_suite.py --skip checks generate train embed --fidelity gpu256   # the ablation alone
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
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


def check_bf16_generation(fixtures: dict[str, Path], steps: int = 10) -> dict:
    """The same random-weight model and seeds in fp32 and bf16: images must stay close."""
    from htd_toolkit.data.sources import CropBank, load_maps
    from htd_toolkit.generate.bundle import conditions_for
    from htd_toolkit.models.pipeline import HTDPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    entries, _ = load_maps(fixtures["maps"])
    bank = CropBank(fixtures["maps"] / "crop_bank")
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = HTDPipeline.from_pretrained(fixtures["model"], base_model=fixtures["base"], torch_dtype=dtype).to(device)
        items = [conditions_for(i, 0, entries, bank, pipe.htd_config, {}) for i in range(2)]
        images[dtype] = pipe(semantic_map=[it[1] for it in items], crops=[it[2] for it in items],
                             generator=pipe.seeded([1, 2]), num_inference_steps=steps, guidance_scale=2.0,
                             output_type="np").images.astype(float)
        del pipe
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


def check_path_on_device(root: Path) -> dict:
    """Every stage's device code end to end at toy sizes: the recipe (tiny base, 4 steps, bf16, a
    checkpoint, a validation grid), `generate` from the folder it saved, `evaluate` (FD, DeepLabv3+,
    memorization) on that bundle, and `prepare unannotated` (timm encoder + k-means) on the slide."""
    from htd_toolkit.recipes.train_controlnet import cli as train

    from htd_toolkit.cli import main as toolkit
    from htd_toolkit.testing.tiny_base import write_tiny_base

    gen = load("generate")
    base = write_tiny_base(root / "tiny-base", layout="sd15")
    data = gen.prepare_maps(root / "tiny-data", gen.SHAPES["toy"])
    model, bundle = root / "trained", root / "bundle"
    result = {"check": "recipe, generate, evaluate and prepare unannotated run on the device"}
    result["trained"] = train([
        "--config", str(HERE.parent / "recipes" / "configs" / "demo.yaml"), "--pretrained_model_name_or_path",
        str(base), "--train_data_dir", str(data), "--output_dir", str(model), "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--validation_steps", "4", "--mixed_precision", "bf16"]) == 0
    result["validation_grid"] = (model / "validation" / "step-000004.png").exists()
    result["generated"] = result["trained"] and toolkit([
        "generate", "--model", str(model), "--maps", str(data), "--crop-bank", str(data / "crop_bank"),
        "--num-samples", "8", "--out", str(bundle), "--batch-size", "4", "--steps", "3"]) == 0
    result["evaluated"] = result["generated"] and toolkit([
        "evaluate", "--real", str(data), "--synthetic", str(bundle), "--out", str(root / "metrics.json"),
        "--encoders", "stain-stats,timm:vit_tiny_patch16_224", "--segmentation", "deeplabv3plus", "--epochs", "1",
        "--seg-size", "64", "--seg-encoder", "resnet18", "--memorization", "--size", "64",
        "--test-split", "train"]) == 0
    result["unannotated"] = toolkit([
        "prepare", "unannotated", "--slides", str(data.parent / "slides"), "--out", str(root / "tcga"),
        "--encoder", "timm:vit_tiny_patch16_224", "--k", "4", "--mpp", "1.0", "--tile-size", "56",
        "--patch-size", "128", "--stride", "64", "--split", "1,0,0", "--per-slide", "500"]) == 0
    result["ok"] = all(v for k, v in result.items() if k != "check")
    return result


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
    parser.add_argument("--gen-images", type=int, default=8, help="per timed run: at least two batches")
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time compiled generation and training steps")
    parser.add_argument("--gen-batch-sweep", type=int, nargs="*", default=[],
                        help="more batch sizes for ours, eager, against stock at --gen-batch")
    parser.add_argument("--compile-stock", action="store_true",
                        help="compile the stock pipeline too (several minutes; docs/performance.md gives its H200 figure)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["checks", "generate", "train", "embed"])
    parser.add_argument("--fidelity", choices=["gpu256", "toy256"], default=None,
                        help="last, the fidelity ablation at this shape of benchmarks/fidelity.py")
    args = parser.parse_args()
    report = {"environment": environment(), "checks": [], "rows": [], "fidelity": []}
    print(json.dumps(report["environment"]), flush=True)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    generate, train = load("generate"), load("train")
    with tempfile.TemporaryDirectory(prefix="htd-gpu-suite-") as tmp:
        fixtures = generate.write_fixtures(Path(tmp), args.shape)
        parts = []  # eager first, compiled last: a run cut short still brings back the eager table
        if "checks" not in args.skip:
            parts += [("checks", lambda: check_bf16_generation(fixtures)),
                      ("checks", lambda: check_training_learns(args.shape)),
                      ("checks", lambda: check_path_on_device(Path(tmp)))]
        eager: dict[str, dict] = {}  # compiled rows reuse the eager rows' stock and plain figures

        def generate_row(compiled: bool, batch: int = args.gen_batch) -> dict:
            reuse = eager.get("generate") if (compiled and not args.compile_stock) or batch != args.gen_batch else None
            row = generate.run(fixtures, args.shape, batch, max(args.gen_images, 2 * batch), args.gen_steps, 7.5,
                               compiled, compiled and args.compile_stock, reuse)
            eager.setdefault("generate", row)
            label = " (compiled)" if compiled else "" if batch == args.gen_batch else f" (ours at batch {batch})"
            return {"workload": "generate" + label, **row}

        def train_row(compiled: bool) -> dict:
            row = train.run(args.shape, args.train_batch, compiled, reps=5, plain_row=eager.get("train"))
            eager.setdefault("train", row)
            return {"workload": "train (compiled)" if compiled else "train", **row}

        for compiled in (False, True) if args.compile else (False,):
            if "generate" not in args.skip:
                parts.append(("rows", lambda c=compiled: generate_row(c)))
            if "train" not in args.skip:
                parts.append(("rows", lambda c=compiled: train_row(c)))
            if "embed" not in args.skip and not compiled:
                parts.append(("rows", lambda: embedding_throughput(args.shape)))
        if "generate" not in args.skip:  # the least needed rows last
            parts += [("rows", lambda b=batch: generate_row(False, b)) for batch in args.gen_batch_sweep]
        if args.fidelity:
            parts.append(("fidelity", lambda: fidelity_part(args.fidelity, (out or Path(tmp)) / "fidelity")))
        for number, (key, part) in enumerate(parts):
            try:
                result = part()
            except Exception as err:  # one broken part must not cost the measurements after it
                traceback.print_exc()
                result = {"part": number, "error": f"{type(err).__name__}: {err}"[:2000], "ok": False}
            report[key].append(result)
            print(json.dumps(result), flush=True)
            if out:  # after every part: a run stopped at its time limit keeps what it measured
                (out / "gpu_suite.json").write_text(json.dumps(report, indent=1))
                (out / "gpu_suite.md").write_text(table(report["rows"]) + fidelity_tables(report["fidelity"]))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("\n" + table(report["rows"]) + fidelity_tables(report["fidelity"]))


def fidelity_part(shape: str, out: Path) -> dict:
    """benchmarks/fidelity.py at `shape` into `out`, the settings that decide the paper's claim (map only and
    HTD's crop adapter) to fit one device call: its table and wall time (the rest in out/fidelity.json)."""
    fidelity = load("fidelity")
    report = fidelity.run(fidelity.parse_args(["--shape", shape, "--out", str(out), "--modes", "none,adapter"]))
    return {"part": f"fidelity ({shape})", "table": report["table"], "wall_seconds": report["wall_seconds"],
            "base": json.loads((Path(report["base"]) / "pretrain_report.json").read_text()), "ok": True}


def fidelity_tables(parts: list[dict]) -> str:
    return "".join(f"\n{p['part']}, {p['wall_seconds']:.0f} s:\n\n{p['table']}\n" for p in parts if "table" in p)


def table(rows: list[dict]) -> str:
    """Markdown: throughput of stock and ours, ratio, first batch or step (compilation) and peak memory."""
    lines = ["| workload | batch | stock | ours | ratio | ours first batch/step | peak GiB stock / ours |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| part {row['part']} failed | | {row['error'][:120]} | | | | |")
            continue
        unit = next(u for u in ("images", "samples", "tiles") if any(k.endswith(f"{u}_per_s") for k in row))
        stock = next(v for k, v in row.items() if k.endswith(f"{unit}_per_s") and not k.startswith("ours"))
        ours = row[f"ours_{unit}_per_s"]
        first = row.get("ours_first_batch_s", row.get("ours_first_step_s"))
        peaks = " / ".join("–" if row.get(k) is None else f"{row[k]:.1f}" for k in ("stock_peak_GiB", "ours_peak_GiB"))
        lines.append(f"| {row['workload']} | {row['batch']} | {stock:.2f} {unit}/s | {ours:.2f} {unit}/s "
                     f"| {row['ratio']:.2f}x | {'–' if first is None else f'{first:.1f} s'} | {peaks} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
