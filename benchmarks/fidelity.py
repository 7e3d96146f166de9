"""HTD's ablation at small scale: map only vs pooled embedding vs crop canvas vs crop adapter (HTD).

On the CC0 sample slide, with the H&E base shipped in the package (trained on the slide's top 80 %):

1. the slide's top 80 % and bottom 20 % are written as two pyramidal TIFFs (train / held out);
2. `prepare unannotated` (stain-stats, k = 3 tissue types, 16-px tiles at 1 µm/px, 64-px patches)
   on the train region; the held-out region gets pseudo-maps from the same centroids, and its own
   crop bank;
3. the real recipe fine-tunes the base in each `--crop_mode` with the same steps, data and seed;
4. `htd-toolkit generate` makes images from the held-out maps with crops from the held-out region;
5. each setting is scored: map fidelity (a stain-statistics cell segmenter fitted on the real
   training patches: mIoU against the conditioning maps, beside the same images against shuffled
   maps, and VAE reconstructions of the held-out real patches as the ceiling), crop fidelity (each
   region's distance to its own crop vs another class's crop), a crop-swap test, and
   `htd-toolkit evaluate` (FD over two encoders against the held-out patches; the memorization audit
   against the training patches).

    python benchmarks/fidelity.py --out runs/fidelity           # CPU: the figures of docs/fidelity.md
    python benchmarks/fidelity.py --shape toy --out /tmp/fid    # seconds: proves it runs
    python benchmarks/fidelity.py --pool runs/a runs/b --modes none,adapter --out runs/pooled
                                                                # two runs' (e.g. seeds') images pooled, FD only
    python benchmarks/fidelity.py --shape gpu256 --out $OUT/fid # GPU: 256-px patches at 0.5 µm/px, on a base
                                                                # pretrained there first (gpu_suite.py --fidelity)

Writes OUT/fidelity.json, OUT/fidelity.md (the table) and OUT/fidelity.png (map | crops | settings | real).
`--ship` also copies the `adapter` model into the package (htd_toolkit/base/he_adapter_cc0, fp16) and
writes the routing tests' fixture (tests/fixtures/fidelity_cc0.npz: held-out maps and crops, the segmenter).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("none", "embedding", "canvas", "adapter")
# Patch geometry: µm/px, patch side, map cell (tile) side, window stride and crop-adapter input side, in px.
# Both map 16-µm cells; the 256-px patches at the slide's native 0.5 µm/px see 128 µm with 4x the detail.
PX64 = dict(mpp=1.0, patch=64, tile=16, stride=16, crop=32, workers=0, gen_batch=16)
PX256 = dict(mpp=0.5, patch=256, tile=32, stride=32, crop=64, workers=4, gen_batch=64)
SHAPES = {
    "cpu": dict(steps=3000, batch=16, samples=96, inference_steps=20, patches=4000, per_slide=4000, **PX64),
    "toy": dict(steps=2, batch=4, samples=4, inference_steps=2, patches=200, per_slide=4000, **PX64),
    # No 256-px base ships: these shapes pretrain one on the whole slide's top 80 % first (`pretrain-base`).
    "gpu256": dict(steps=1500, batch=16, samples=320, inference_steps=20, patches=4000, per_slide=4000,
                   base=dict(minutes=3.0, patches=2000), **PX256),
    "toy256": dict(steps=2, batch=2, samples=4, inference_steps=2, patches=64, per_slide=4000,
                   base=dict(vae_steps=2, unet_steps=2, patches=32), **{**PX256, "workers": 0, "gen_batch": 4}),
}
ENCODERS = ("stain-stats", "timm:resnet18")


def prepare_options(shape: dict) -> list[str]:
    return ["--encoder", "stain-stats", "--k", "3", "--mpp", str(shape["mpp"]), "--tile-size", str(shape["tile"]),
            "--patch-size", str(shape["patch"]), "--stride", str(shape["stride"]), "--split", "1,0,0",
            "--per-slide", str(shape["per_slide"])]


def run_cli(args: list[str]) -> None:
    from htd_toolkit.cli import main

    code = main(args)
    if code != 0:
        raise SystemExit(f"htd-toolkit {' '.join(args[:2])} failed with exit status {code}")


def write_regions(out: Path, holdout_fraction: float = 0.2) -> tuple[Path, Path]:
    """The CC0 slide's top and bottom bands as two pyramidal TIFFs, split where the base's held-out band starts."""
    from htd_toolkit.wsi.pyramid import write_slide_region
    from htd_toolkit.wsi.sample_slide import sample_slide_path
    from htd_toolkit.wsi.slide import Slide

    slide = sample_slide_path()
    with Slide(slide) as opened:
        width, height = opened.dimensions
    boundary = int((1 - holdout_fraction) * height)
    paths = {}
    for name, (top, rows) in {"train": (0, boundary), "heldout": (boundary, height - boundary)}.items():
        paths[name] = out / "slides" / name / f"skin_{name}.tif"
        if not paths[name].exists():
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            write_slide_region(slide, paths[name], (0, top), (width, rows))
    return paths["train"], paths["heldout"]


def prepare(out: Path, shape: dict) -> tuple[Path, Path]:
    """Pseudo-maps on the train region; the held-out region mapped with the same centroids."""
    train_slide, heldout_slide = write_regions(out)
    prepared, heldout = out / "prepared", out / "heldout"
    options = prepare_options(shape)
    if not (prepared / "manifest.json").exists():
        run_cli(["prepare", "unannotated", "--slides", str(train_slide.parent), "--out", str(prepared), *options])
    if not (heldout / "manifest.json").exists():
        run_cli(["prepare", "unannotated", "--slides", str(heldout_slide.parent), "--out", str(heldout), *options,
                 "--centroids", str(prepared / "clusters" / "centroids.safetensors")])
    return prepared, heldout


def quality_run(doc: str, shapes: dict, argv: list[str] | None,
                extra: tuple[tuple[str, dict], ...] = ()) -> tuple[argparse.Namespace, dict, Path, Path]:
    """The command line of a quality benchmark built on this preparation (`--out`, `--shape` of `shapes`, and
    the `extra` (flag, add_argument keywords) it takes): its arguments, its shape, and the prepared training
    and held-out folders in OUT (made when missing)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(shapes), default="cpu")
    for flag, keywords in extra:
        parser.add_argument(flag, **keywords)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return (args, shapes[args.shape], *prepare(args.out, SHAPES["cpu"]))


def pretrained_base(out: Path, shape: dict, seed: int) -> Path:
    """The shape's own base, pretrained from scratch on the slide (its bottom 20 % held out, as the
    shipped base's) at the shape's patch size and resolution; resumed or reused when OUT holds it."""
    from htd_toolkit.base.pretrain import PretrainOptions, pretrain_base
    from htd_toolkit.wsi.sample_slide import sample_slide_path

    base = out / "base"
    if not (base / "pretrain_report.json").exists():
        pretrain_base(PretrainOptions(slides=[sample_slide_path()], out=base, patch_size=shape["patch"],
                                      mpp=shape["mpp"], seed=seed, **shape["base"]))
    return base


def finetune(base: Path, prepared: Path, mode: str, out: Path, shape: dict, seed: int,
             stain_jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[Path, float | None]:
    """The fine-tuned model and its wall time (None when an earlier run's model in OUT was reused); an
    interrupted fine-tune continues from its last checkpoint."""
    from htd_toolkit.recipes.train_controlnet import cli as train

    model = out / "models" / mode
    start = time.perf_counter()
    if (model / "htd_config.json").exists():
        return model, None
    code = train(["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(prepared),
                  "--output_dir", str(model), "--crop_mode", mode, "--resolution", str(shape["patch"]),
                  "--train_batch_size", str(shape["batch"]), "--max_train_steps", str(shape["steps"]),
                  "--learning_rate", "5e-4", "--lora_learning_rate", "5e-4", "--lr_warmup_steps", "20",
                  "--crop_size", str(shape["crop"]), "--max_crops", "3", "--embed_dim", "64", "--lora_rank", "8",
                  "--lora_alpha", "8", "--checkpointing_steps", "200", "--checkpoints_total_limit", "1",
                  "--validation_steps", str(shape["steps"]), "--num_validation_images", "4",
                  "--validation_inference_steps", str(shape["inference_steps"]), "--dataloader_num_workers", str(shape["workers"]),
                  "--shuffle_buffer", "512", "--mixed_precision", "no", "--report_to", "none",
                  "--stain_jitter", str(stain_jitter[0]), "--stain_jitter_shift", str(stain_jitter[1]),
                  "--resume_from_checkpoint", "latest", "--seed", str(seed)])
    if code != 0:
        raise SystemExit(f"fine-tuning in mode {mode} failed")
    return model, time.perf_counter() - start


def generate(model: Path, heldout: Path, out: Path, shape: dict, seed: int, guidance: float) -> Path:
    bundle = out / "bundles" / model.name
    run_cli(["generate", "--model", str(model), "--maps", str(heldout), "--crop-bank", str(heldout / "crop_bank"),
             "--num-samples", str(shape["samples"]), "--out", str(bundle), "--batch-size", str(shape["gen_batch"]),
             "--steps", str(shape["inference_steps"]), "--guidance", str(guidance), "--seed", str(seed),
             "--shard-size", str(shape["samples"])])
    return bundle


def read_bundle(bundle: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Images, masks and metadata of every sample of a bundle's train split, in order."""
    from htd_toolkit.data.folder import shard_files
    from htd_toolkit.data.shards import decode_image, image_member, read_tar

    manifest = json.loads((bundle / "manifest.json").read_text())
    images, masks, metas = [], [], []
    for _, path in shard_files(bundle, manifest, "train"):
        for _, members in read_tar(path):
            members = dict(members)
            images.append(decode_image(image_member(members), "RGB"))
            masks.append(decode_image(members["mask.png"]))
            metas.append(json.loads(members["json"]))
    return np.stack(images), np.stack(masks), metas


def sample_crops(metas: list[dict], bank) -> list[dict[int, np.ndarray]]:
    """Per sample, the crop-bank pixels of the crops its metadata names, by class."""
    keyed = {crop.key: crop for crops in bank.by_class.values() for crop in crops}
    return [{int(c["class"]): keyed[c["key"]].image() for c in meta.get("crops", []) if c.get("key") in keyed}
            for meta in metas]


def vae_reconstructions(base: Path, images: np.ndarray) -> np.ndarray:
    from diffusers import AutoencoderKL

    from htd_toolkit.base.pretrain import reconstruct
    from htd_toolkit.config import compute_device

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").float().eval().to(compute_device())
    return reconstruct(vae, images)


def swap_test(model: Path, maps: np.ndarray, crops: list[dict[int, np.ndarray]], seeds: list[int],
              steps: int, limit: int = 32) -> dict:
    """Exchange the crops of each sample's two largest classes: does each region's colour move towards
    the crop it now gets? Share of regions that moved closer, and the mean change in distance."""
    from htd_toolkit.evaluate.fidelity import swap_movement
    from htd_toolkit.models.pipeline import HTDPipeline

    pipe = HTDPipeline.for_inference(model)  # as `generate` runs it: bf16 on a GPU
    picked = [i for i, c in enumerate(crops) if len(c) >= 2][:limit]
    if not picked:
        return {"regions": 0}
    exchanged = []  # the two largest classes' crops, each given the other's
    for i in picked:
        a, b = sorted(crops[i], key=lambda c: -(maps[i] == c).sum())[:2]
        exchanged.append({a: crops[i][b], b: crops[i][a]})
    chosen_maps = [maps[i] for i in picked]
    chosen_seeds = [seeds[i] for i in picked]
    before = pipe(semantic_map=chosen_maps, crops=[crops[i] for i in picked], generator=pipe.seeded(chosen_seeds),
                  num_inference_steps=steps, output_type="np").images
    after = pipe(semantic_map=chosen_maps, crops=[{**crops[i], **e} for i, e in zip(picked, exchanged, strict=True)],
                 generator=pipe.seeded(chosen_seeds), num_inference_steps=steps, output_type="np").images
    change = np.array(swap_movement(np.stack(chosen_maps), exchanged, before, after))
    return {"moved_towards_swapped_crop": round(float(np.mean(change < 0)), 4),
            "mean_distance_change": round(float(np.mean(change)), 4), "regions": len(change)}


def score_setting(segmenter, images, masks, crops, classes, rng) -> dict:
    from htd_toolkit.evaluate.fidelity import crop_fidelity, map_fidelity

    shuffled = masks[rng.permutation(len(masks))]
    return {"map_fidelity": map_fidelity(segmenter, images, masks, classes),
            "map_fidelity_shuffled": map_fidelity(segmenter, images, shuffled, classes),
            "crop_fidelity": crop_fidelity(segmenter, images, masks, crops),
            "mean_rgb": [round(float(v), 4) for v in images.reshape(-1, 3).mean(0) / 255]}


def evaluate_setting(bundle: Path, prepared: Path, heldout: Path, out: Path) -> dict:
    fd_path, mem_path = out / "metrics" / f"{bundle.name}-fd.json", out / "metrics" / f"{bundle.name}-mem.json"
    run_cli(["evaluate", "--real", str(heldout), "--synthetic", str(bundle), "--out", str(fd_path),
             "--encoders", ",".join(ENCODERS), "--real-split", "train"])
    run_cli(["evaluate", "--real", str(prepared), "--synthetic", str(bundle), "--out", str(mem_path),
             "--encoders", "stain-stats", "--memorization", "--real-split", "train"])
    fd = json.loads(fd_path.read_text())
    memo = json.loads(mem_path.read_text())["memorization"]
    return {"fd": fd["fd"], "precision": fd.get("precision"), "recall": fd.get("recall"),
            "near_copies": memo.get("flagged"), "near_copy_threshold": memo.get("threshold")}


def encode_sets(real: np.ndarray, images_by_mode: dict) -> dict:
    """Per encoder: the real images' features and each setting's, each set encoded once."""
    from htd_toolkit.clustering.encoders import get_encoder

    features = {}
    for spec in ENCODERS:
        encoder = get_encoder(spec)
        features[spec] = (encoder(real), {mode: encoder(images) for mode, images in images_by_mode.items()})
    return features


def fd_versus_none(features: dict) -> dict:
    """Per setting and encoder: FD minus `none`'s FD with its bootstrap 95 % interval (same real resamples)."""
    from htd_toolkit.evaluate.fd import bootstrap_fd_difference

    out = {}
    for spec, (real_f, by_mode) in features.items():
        if "none" not in by_mode:
            return {}
        for mode, f in by_mode.items():
            if mode != "none":
                out.setdefault(mode, {})[spec] = [round(v, 4) for v in
                                                  bootstrap_fd_difference(real_f, f, by_mode["none"])]
    return out


def pool(runs: list[Path], modes: list[str], out: Path) -> dict:
    """FD per setting over the images of several runs pooled (runs that differ only in --seed: the
    fine-tuning seed's spread is then in the sample, not only one model's), and each setting minus
    `none` with its bootstrap interval. Writes OUT/pooled.json and prints the table."""
    from htd_toolkit.evaluate.fd import frechet_distance
    from htd_toolkit.evaluate.sets import load_set

    held_out = {(run / "heldout" / "manifest.json").read_text() for run in runs}
    if len(held_out) != 1:
        raise SystemExit("--pool: the runs hold different held-out sets; pool runs of one --shape only")
    real = load_set(runs[0] / "heldout", "train").images
    images = {mode: np.concatenate([read_bundle(run / "bundles" / mode)[0] for run in runs]) for mode in modes}
    features = encode_sets(real, images)
    fd = {mode: {spec: round(float(frechet_distance(real_f, by_mode[mode])), 4)
                 for spec, (real_f, by_mode) in features.items()} for mode in modes}
    report = {"runs": [str(run) for run in runs], "images": {m: len(x) for m, x in images.items()}, "fd": fd,
              "fd_vs_none": fd_versus_none(features)}
    lines = ["| setting | images | " + " | ".join(f"FD {e}" for e in ENCODERS) + " | "
             + " | ".join(f"FD − none, {e} (95 % CI)" for e in ENCODERS) + " |", "|" + "---|" * (2 + 2 * len(ENCODERS))]
    for mode in modes:
        versus = report["fd_vs_none"].get(mode, {})
        lines.append(f"| {mode} | {len(images[mode])} | " + " | ".join(f"{fd[mode][e]:.4f}" for e in ENCODERS) + " | "
                     + " | ".join(interval(versus.get(e)) for e in ENCODERS) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pooled.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return report


def figure(path: Path, masks, crops, images_by_mode: dict, real: np.ndarray, classes, rows: int = 6) -> Path:
    """Rows of map | crops | each setting | a real held-out patch, at 2x."""
    import torch

    from htd_toolkit.classes import class_specs, colorize
    from htd_toolkit.publish.figures import crop_strip

    specs = class_specs(classes)
    size = masks.shape[1]
    lines = []
    for i in range(min(rows, len(masks))):
        slots = sorted(crops[i])
        tensors = torch.stack([torch.from_numpy(np.array(Image.fromarray(crops[i][c]).resize((32, 32))))
                               .permute(2, 0, 1).float() / 127.5 - 1 for c in slots]) if slots else None
        strip = crop_strip(tensors, torch.tensor(slots) if slots else None, size)
        row = [colorize(masks[i], specs), strip, *[images_by_mode[m][i] for m in images_by_mode], real[i % len(real)]]
        lines.append(np.concatenate(row, axis=1))
    grid = np.concatenate(lines, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(path)
    return path


def interval(value: list | None) -> str:
    return "n/a" if not value else f"{value[0]:+.3f} [{value[1]:+.3f}, {value[2]:+.3f}]"


def table(results: dict, ceiling: dict, real_rule: dict) -> str:
    encoders = sorted({e for r in results.values() for e in r["evaluate"]["fd"]})
    head = ["setting", "map mIoU", "shuffled maps", "crop colour: own / other (closer)",
            "crop features: own / other (closer)", "swap: moved", *[f"FD {e}" for e in encoders],
            *[f"FD − none, {e} (95 % CI)" for e in encoders], "near-copies", "fine-tune s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, r in results.items():
        crop = r["score"]["crop_fidelity"]

        def fmt(space, crop=crop):
            c = crop.get(space)
            return f"{c['own_crop']:.3f} / {c['other_crop']:.3f} ({c['closer_to_own']:.0%})" if c else "n/a"
        swap = r.get("swap", {}).get("moved_towards_swapped_crop")
        lines.append("| " + " | ".join([
            mode, f"{r['score']['map_fidelity']['miou']:.3f}", f"{r['score']['map_fidelity_shuffled']['miou']:.3f}",
            fmt("colour"), fmt("features"), "n/a" if swap is None else f"{swap:.0%}",
            *[f"{r['evaluate']['fd'].get(e, float('nan')):.3g}" for e in encoders],
            *[interval(r.get("fd_vs_none", {}).get(e)) for e in encoders],
            str(r["evaluate"]["near_copies"]),
            "reused" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"]) + " |")
    lines.append(f"| VAE reconstructions of held-out real patches (ceiling) | {ceiling['miou']:.3f} | | | | | "
                 + " | " * 2 * len(encoders) + " | |")
    lines.append(f"| held-out real patches (the segmenter itself) | {real_rule['miou']:.3f} | | | | | "
                 + " | " * 2 * len(encoders) + " | |")
    return "\n".join(lines)


def ship(model: Path, masks: np.ndarray, crops: list[dict[int, np.ndarray]], segmenter, count: int = 16) -> None:
    """The adapter model into the package (fp16, no base: it resolves to the shipped one) and the tests' fixture."""
    import torch
    from diffusers import ControlNetModel

    from htd_toolkit.base.shipped import SHIPPED_ADAPTER
    from htd_toolkit.publish.cards import name_repo_in_model_card

    root = Path(__file__).resolve().parents[1]
    shutil.rmtree(SHIPPED_ADAPTER, ignore_errors=True)
    SHIPPED_ADAPTER.mkdir(parents=True)
    for name in ("htd_config.json", "id2label.json", "pytorch_lora_weights.safetensors", "crop_adapter", "README.md"):
        source = model / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, SHIPPED_ADAPTER / name)
    ControlNetModel.from_pretrained(model / "controlnet").to(torch.float16).save_pretrained(SHIPPED_ADAPTER / "controlnet")
    name_repo_in_model_card(SHIPPED_ADAPTER, SHIPPED_ADAPTER.name)
    picked = [i for i, c in enumerate(crops) if len(c) >= 2][:count]
    size = 32
    fixture_crops = np.zeros((len(picked), 2, size, size, 3), np.uint8)
    fixture_classes = np.zeros((len(picked), 2), np.int64)
    for row, i in enumerate(picked):
        for slot, cls in enumerate(sorted(crops[i], key=lambda c: -(masks[i] == c).sum())[:2]):
            fixture_crops[row, slot] = np.asarray(Image.fromarray(crops[i][cls]).resize((size, size), Image.BICUBIC))
            fixture_classes[row, slot] = cls
    np.savez_compressed(root / "tests" / "fixtures" / "fidelity_cc0.npz", maps=masks[picked], crops=fixture_crops,
                        crop_classes=fixture_classes, seg_tile=segmenter.tile, seg_mean=segmenter.mean,
                        seg_std=segmenter.std, seg_class_means=segmenter.class_means)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--base", type=Path, default=None, help="SD base folder (default: the shipped H&E base)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance on the crops")
    parser.add_argument("--stain-jitter", type=float, nargs=2, default=(0.0, 0.0), metavar=("SCALE", "SHIFT"),
                        help="the recipe's --stain_jitter and --stain_jitter_shift for every fine-tune")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per setting (default: the shape's)")
    parser.add_argument("--samples", type=int, default=None, help="images per setting (default: the shape's)")
    parser.add_argument("--ship", action="store_true", help="copy the adapter model and the test fixture into the tree")
    parser.add_argument("--pool", type=Path, nargs="+", metavar="RUN", default=None,
                        help="no training: FD of --modes over the images of these finished runs (e.g. two --seed "
                             "runs) pooled, written to OUT/pooled.json")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns the report it writes to OUT/fidelity.json (with its table under `table`)."""
    from htd_toolkit.base.shipped import shipped_base
    from htd_toolkit.cli import quiet_libraries
    from htd_toolkit.data.sources import CropBank
    from htd_toolkit.evaluate.fidelity import TileSegmenter, map_fidelity
    from htd_toolkit.evaluate.sets import load_set

    quiet_libraries()
    shape, out = dict(SHAPES[args.shape]), args.out
    shape["samples"] = args.samples or shape["samples"]
    shape["steps"] = args.steps or shape["steps"]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = args.base or (pretrained_base(out, shape, args.seed) if "base" in shape else shipped_base())
    prepared, heldout = prepare(out, shape)
    classes = json.loads((prepared / "manifest.json").read_text())["classes"]
    names = [c["name"] for c in classes]
    real = load_set(prepared, "train", shape["patches"])
    real_heldout = load_set(heldout, "train")
    segmenter = TileSegmenter.fit(real.images, real.masks, len(names), shape["tile"])
    ceiling = map_fidelity(segmenter, vae_reconstructions(base, real_heldout.images), real_heldout.masks, names)
    real_rule = map_fidelity(segmenter, real_heldout.images, real_heldout.masks, names)
    bank = CropBank(heldout / "crop_bank")
    rng = np.random.default_rng(args.seed)
    results, images_by_mode, crops_by_index = {}, {}, None
    modes = [m for m in MODES if m in args.modes.split(",")]
    for mode in sorted(modes, key=lambda m: m != "adapter"):  # adapter first: its crops serve `none` too
        model, seconds = finetune(base, prepared, mode, out, shape, args.seed, tuple(args.stain_jitter))
        bundle = generate(model, heldout, out, shape, args.seed, args.guidance)
        images, masks, metas = read_bundle(bundle)
        crops = sample_crops(metas, bank)
        crops_by_index = crops_by_index or crops
        crops = crops if any(crops) else crops_by_index
        results[mode] = {"train_seconds": None if seconds is None else round(seconds, 1),
                         "score": score_setting(segmenter, images, masks, crops, names, rng),
                         "evaluate": evaluate_setting(bundle, prepared, heldout, out)}
        if mode != "none":
            results[mode]["swap"] = swap_test(model, masks, crops, [m["seed"] for m in metas],
                                              shape["inference_steps"])
        images_by_mode[mode] = images
        maps_for_figure = masks
    results = {m: results[m] for m in modes}
    images_by_mode = {m: images_by_mode[m] for m in modes}
    for mode, versus in fd_versus_none(encode_sets(real_heldout.images, images_by_mode)).items():
        results[mode]["fd_vs_none"] = versus
    report = {"shape": args.shape, "settings": shape, "guidance": args.guidance,
              "stain_jitter": list(args.stain_jitter), "base": str(base), "classes": names, "results": results,
              "ceiling_vae_reconstructions": ceiling, "segmenter_on_real_held_out": real_rule,
              "real_mean_rgb": [round(float(v), 4) for v in real.images.reshape(-1, 3).mean(0) / 255],
              "wall_seconds": round(time.perf_counter() - started, 1)}
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(results, ceiling, real_rule)
    (out / "fidelity.md").write_text(text + "\n")
    figure(out / "fidelity.png", maps_for_figure, crops_by_index, images_by_mode, real_heldout.images, classes)
    if args.ship:
        ship(out / "models" / "adapter", maps_for_figure, crops_by_index, segmenter)
    print(text)
    print(f"wall time {report['wall_seconds']:.0f} s; {out / 'fidelity.json'}, {out / 'fidelity.png'}")
    return {**report, "table": text}


def main() -> None:
    args = parse_args()
    if args.ship and "base" in SHAPES[args.shape]:
        raise SystemExit("--ship: only the shapes fine-tuned on the shipped base can ship (cpu, toy)")
    if args.pool:
        pool(args.pool, [m for m in MODES if m in args.modes.split(",")], args.out)
        return
    run(args)


if __name__ == "__main__":
    main()
