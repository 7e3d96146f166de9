"""Train on synthetic, test on real: what a downstream segmenter learns from the pairs.

The paper's headline downstream result is DeepLabv3+ trained only on synthetic pairs scoring near one
trained on real pairs. At this project's toy scale, on the CC0 slide of `benchmarks/fidelity.py`:

1. the training region's real patches whose maps hold only classes its crop bank has crops of;
2. the shipped adapter model's images for exactly those maps (crops from the training crop bank), with
   `keep_glass` off (the model alone, as before the glass change) and on;
3. the project's DeepLabv3+ (`evaluate/segmentation.py`, random init, the same epochs and size) trained
   on each of the three sets, the same number of pairs each, for each seed;
4. each scored on the held-out region's real patches: mIoU and per-class IoU (background included).

    python benchmarks/tstr.py --out runs/tstr                 # CPU: about 50 minutes on 2 cores
    python benchmarks/tstr.py --out /tmp/tstr --shape toy     # seconds after the preparation
    python benchmarks/tstr.py --out runs/tstr --reuse docs/tstr.json
        # keep glass only (15 minutes): the real and model-only rows from an earlier run of the same
        # shape, which the glass mechanism does not touch (same data, same training, keep_glass off)

Writes OUT/tstr.json and prints the table of docs/fidelity.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent))  # after site-packages: benchmarks/evaluate.py must not shadow HF evaluate

SHAPES = {"cpu": dict(samples=None, steps=20, epochs=8, seeds=(0, 1), size=64),
          "toy": dict(samples=8, steps=2, epochs=1, seeds=(0,), size=64)}


def training_pairs(prepared: Path, limit: int | None):
    """Real training patches whose tissue classes all have crops in the training crop bank, and the bank."""
    from htd_toolkit.data.sources import CropBank
    from htd_toolkit.evaluate.sets import load_set

    real = load_set(prepared, "train")
    bank = CropBank(prepared / "crop_bank")
    usable = [i for i, labels in enumerate(real.masks)
              if all(int(c) in bank.by_class for c in np.unique(labels) if 0 < c < 255)][:limit]
    return real.images[usable], real.masks[usable], real.classes, bank


def synthetic_images(masks: np.ndarray, bank, steps: int, keep_glass: bool) -> np.ndarray:
    from htd_toolkit.base.shipped import shipped_adapter_model
    from htd_toolkit.classes import names_by_index
    from htd_toolkit.models.pipeline import HTDPipeline

    pipe = HTDPipeline.from_pretrained(shipped_adapter_model())
    names = names_by_index(pipe.htd_config.classes)
    rng = np.random.default_rng(0)
    crops = [bank.draw_crops([int(c) for c in np.unique(m) if 0 < c < 255], rng, names)[0] for m in masks]
    batches = [pipe(semantic_map=list(masks[i:i + 32]), crops=crops[i:i + 32], num_inference_steps=steps,
                    generator=pipe.seeded(list(range(i, min(i + 32, len(masks))))), output_type="np",
                    keep_glass=keep_glass).images for i in range(0, len(masks), 32)]
    return np.concatenate(batches)


def train_and_score(images, masks, test, classes, shape: dict) -> list[dict]:
    from htd_toolkit.evaluate.segmentation import score, train_segmenter

    scores = []
    for seed in shape["seeds"]:
        model = train_segmenter(images, masks, len(classes), shape["epochs"], size=shape["size"], seed=seed)
        scores.append(score(model, test.images, test.masks, classes, size=shape["size"]))
    return scores


def summary(scores: list[dict]) -> dict:
    mious = [s["miou"] for s in scores]
    classes = scores[0]["per_class"]
    return {"miou_mean": round(float(np.mean(mious)), 4), "miou_per_seed": [round(m, 4) for m in mious],
            "per_class_mean": {c: round(float(np.mean([s["per_class"][c] for s in scores])), 4) for c in classes}}


def reused_rows(path: Path, pairs: int, shape: dict) -> dict:
    """The real and model-only rows of an earlier run, refused unless it had this run's pairs and shape."""
    earlier = json.loads(path.read_text())
    same = (earlier["pairs"], earlier["epochs"], earlier["seeds"], earlier["size"]) == \
        (pairs, shape["epochs"], list(shape["seeds"]), shape["size"])
    if not same:
        raise SystemExit(f"--reuse {path}: made with other pairs, epochs, seeds or size than this run")
    return {name: earlier["sets"][name] for name in ("real", "synthetic, model only")}


def main(argv: list[str] | None = None) -> dict:
    import fidelity

    from htd_toolkit.evaluate.sets import load_set

    args, shape, prepared, heldout = fidelity.quality_run(__doc__, SHAPES, argv, extra=(
        ("--reuse", dict(type=Path, help="an earlier tstr.json of this shape: its real and model-only rows")),))
    images, masks, classes, bank = training_pairs(prepared, shape["samples"])
    test = load_set(heldout, "train")
    reused = reused_rows(args.reuse, len(masks), shape) if args.reuse else {}
    sets = {} if reused else {"real": images}
    seconds = {}
    for keep in (False, True) if not reused else (True,):
        started = time.perf_counter()
        sets["synthetic, keep glass" if keep else "synthetic, model only"] = synthetic_images(masks, bank,
                                                                                              shape["steps"], keep)
        seconds["generate, keep glass" if keep else "generate, model only"] = round(time.perf_counter() - started, 1)
    results = {"pairs": len(masks), "test_patches": len(test.masks), "epochs": shape["epochs"],
               "seeds": list(shape["seeds"]), "size": shape["size"], "sets": dict(reused), "seconds": seconds}
    if reused:
        results["reused"] = {"from": str(args.reuse), "sets": sorted(reused)}
    for name, pictures in sets.items():
        started = time.perf_counter()
        results["sets"][name] = summary(train_and_score(pictures, masks, test, classes, shape))
        results["seconds"][f"train, {name}"] = round(time.perf_counter() - started, 1)
    (args.out / "tstr.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
