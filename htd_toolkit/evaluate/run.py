"""`htd-toolkit evaluate`: metrics.json (docs/formats.md) for a synthetic set against real data, and the cards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit import __version__
from htd_toolkit.clustering.encoders import get_encoder
from htd_toolkit.data.folder import write_manifest
from htd_toolkit.errors import UserError, check_number
from htd_toolkit.evaluate import memorization as mem
from htd_toolkit.evaluate.fd import frechet_distance
from htd_toolkit.evaluate.precision_recall import precision_recall
from htd_toolkit.evaluate.segmentation import IOU_DEFINITION
from htd_toolkit.evaluate.sets import ImageSet, allocate, check_compatible, load_set, resized
from htd_toolkit.files import write_atomic

MAX_SIDE = 4096


@dataclass
class EvaluateOptions:
    real: str
    synthetic: str
    out: Path
    encoders: list[str] = field(default_factory=lambda: ["stain-stats"])
    segmentation: str | None = None
    epochs: int = 10
    memorization: bool = False
    update_card: bool = False
    real_split: str = "train"
    test_split: str = "test"
    limit: int | None = None
    seg_size: int = 256
    seg_encoder: str = "resnet34"
    k: int = 3
    seed: int = 0
    model: Path | None = None
    size: int | None = None  # compare both sets at size x size
    overwrite: bool = False  # replace an --out (and memorization.png beside it) that evaluate did not write

    def check(self) -> None:
        # image sides up to 4,096 px (a 1,024-px patch at 4x): beyond, one image alone takes gigabytes
        for option, value, low, high in (("--epochs", self.epochs, 1, None), ("--limit", self.limit, 2, None),
                                         ("--k", self.k, 1, None), ("--seg-size", self.seg_size, 8, MAX_SIDE),
                                         ("--size", self.size, 8, MAX_SIDE)):
            check_number(option, value, low, high)
        if not self.encoders:
            raise UserError("--encoders: name at least one encoder (e.g. stain-stats)")


def held_out(options: EvaluateOptions) -> ImageSet:
    for split in (options.test_split, "validation"):
        try:
            return load_sized(options.real, split, options)
        except UserError:
            continue
    raise UserError(f"{options.real}: no held-out real split ({options.test_split} or validation) to score on")


def load_sized(source: str, split: str, options: EvaluateOptions) -> ImageSet:
    images = load_set(source, split, options.limit)
    return resized(images, options.size) if options.size else images


def no_bar(description: str, total: int):
    return lambda n=1: None


def joined(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Both arrays one after the other, memory-mapped when large (sets.allocate)."""
    out = allocate((len(first) + len(second), *first.shape[1:]))
    out[:len(first)], out[len(first):] = first, second
    return out


def segmentation_metrics(options: EvaluateOptions, real: ImageSet, synthetic: ImageSet, bar=no_bar) -> dict:
    from htd_toolkit.evaluate.segmentation import majority_baseline, score, train_segmenter

    if options.segmentation != "deeplabv3plus":
        raise UserError(f"unknown --segmentation {options.segmentation!r}: deeplabv3plus is the one available")
    test = held_out(options)
    k = len(real.classes)
    train_sets = {"synthetic": (synthetic.images, synthetic.masks), "real": (real.images, real.masks),
                  "real+synthetic": (joined(real.images, synthetic.images), joined(real.masks, synthetic.masks))}
    out = {}
    for name, (images, masks) in train_sets.items():
        model = train_segmenter(images, masks, k, options.epochs, options.seg_size, encoder=options.seg_encoder,
                                seed=options.seed, on_epoch=bar(f"DeepLabv3+ on {name}", options.epochs))
        out[name] = score(model, test.images, test.masks, real.classes, options.seg_size)
    out["majority_baseline"] = majority_baseline(real.masks, test.masks, real.classes)
    out["test_samples"] = len(test.keys)
    return out


def written_by_evaluate(path: Path) -> bool:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(metrics, dict) and "fd" in metrics and "toolkit_version" in (metrics.get("settings") or {})


def claim_metrics_file(out: Path, overwrite: bool, inputs: tuple[Path | str | None, ...] = ()) -> None:
    """Before any work: --out is a file evaluate may write (a metrics.json of its own, or new), next to
    which memorization.png may go; its folder is writable. A file of a folder the run reads is never
    replaced, --overwrite or not."""
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out names the metrics JSON file to write")
    figure = out.with_name("memorization.png")  # shared by every metrics file of the folder
    refuse_input_file(out, inputs)
    figure_is_ours = any(written_by_evaluate(path) for path in out.parent.glob("*.json"))
    if not overwrite and ((out.exists() and not written_by_evaluate(out)) or (figure.exists() and not figure_is_ours)):
        raise UserError(f"{out if out.exists() else figure}: exists and was not written by evaluate; "
                        "choose another --out or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.write-test")
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{out}: cannot write there ({err.strerror or err})") from err


def refuse_input_file(out: Path, inputs: tuple[Path | str | None, ...]) -> None:
    from htd_toolkit.data.outputs import resolved

    folders = [resolved(Path(p)) for p in inputs if p is not None and Path(p).exists()]
    if out.exists() and not written_by_evaluate(out) and any(resolved(out).is_relative_to(f) for f in folders):
        raise UserError(f"{out}: a file of a folder this run reads; evaluate never replaces it, --overwrite or not: "
                        "choose another --out")


def run_evaluation(options: EvaluateOptions, bar=no_bar) -> dict:
    """`bar(description, total)` adds a progress bar and returns its advance function (report.progress_bars)."""
    options.check()
    claim_metrics_file(Path(options.out), options.overwrite, (options.real, options.synthetic, options.model))
    real = load_sized(options.real, options.real_split, options)
    synthetic = load_sized(options.synthetic, "train", options)
    check_compatible(real, synthetic)
    smallest = min(len(real.keys), len(synthetic.keys))
    if options.k >= smallest:
        raise UserError(f"--k {options.k}: precision/recall needs more images than neighbours; the smaller set has "
                        f"{smallest} images (use a smaller --k or more images)")
    encoders = [get_encoder(spec) for spec in options.encoders]  # weight problems surface before any work
    metrics: dict = {"fd": {}, "precision": {}, "recall": {}}
    features = {}
    encoded = bar("features, FD, precision/recall", len(encoders))
    for encoder in encoders:
        real_f, syn_f = encoder(real.images), encoder(synthetic.images)
        features[encoder.name] = (real_f, syn_f)
        metrics["fd"][encoder.name] = round(frechet_distance(real_f, syn_f), 6)
        precision, recall = precision_recall(real_f, syn_f, options.k)
        metrics["precision"][encoder.name], metrics["recall"][encoder.name] = precision, recall
        encoded()
    if options.segmentation:
        metrics["segmentation"] = segmentation_metrics(options, real, synthetic, bar)
    if options.memorization:
        audited = bar("memorization audit", 1)
        metrics["memorization"] = memorization_metrics(options, real, synthetic, encoders[0])
        audited()
    metrics["settings"] = {
        "real": _public(options.real), "synthetic": _public(options.synthetic), "real_split": options.real_split,
        "real_samples": len(real.keys), "synthetic_samples": len(synthetic.keys), "size": real.images.shape[1],
        "encoders": [e.name for e in encoders], "precision_recall_k": options.k,
        "segmentation": {"model": "DeepLabv3+", "encoder": options.seg_encoder, "epochs": options.epochs,
                         "size": options.seg_size, "iou": IOU_DEFINITION} if options.segmentation else None,
        "toolkit_version": __version__}
    write_atomic(Path(options.out), (json.dumps(metrics, indent=2) + "\n").encode())
    if options.update_card:
        update_cards(options, metrics)
    return metrics


def _public(source: str) -> str:
    """A Hub id as it is; a local folder by its name only (metrics and cards get published)."""
    return Path(source).name if Path(source).exists() else str(source)


def memorization_metrics(options: EvaluateOptions, real: ImageSet, synthetic: ImageSet, encoder) -> dict:
    crops = crop_images(Path(options.real))
    result = mem.audit(real.images, synthetic.images, encoder, crops)
    figure = Path(options.out).with_name("memorization.png")
    Image.fromarray(mem.side_by_side(result, real.images, synthetic.images)).save(figure)
    return mem.summary(result, encoder.name, synthetic.keys)


def crop_images(folder: Path, side: int = 64) -> np.ndarray | None:
    """The crop bank of a prepared folder (or the bank folder itself), at side x side; None without one."""
    from htd_toolkit.data.sources import CropBank

    if not folder.is_dir():
        return None
    crops = [c.image() for group in CropBank(folder).by_class.values() for c in group]
    if not crops:
        return None
    return np.stack([np.asarray(Image.fromarray(c).resize((side, side), Image.Resampling.BICUBIC)) for c in crops])


def evaluation_text(metrics: dict) -> tuple[str, str | None]:
    """Markdown for the cards: the metric tables, and the memorization paragraph."""
    lines = ["| encoder | Fréchet distance | precision | recall |", "|---|---|---|---|"]
    for name, fd in metrics["fd"].items():
        lines.append(f"| {name} | {fd:.4g} | {metrics['precision'][name]:.3f} | {metrics['recall'][name]:.3f} |")
    settings = metrics["settings"]
    lines.append(f"\nAgainst {settings['real_samples']} real images ({settings['real']}, {settings['real_split']} "
                 f"split); k = {settings['precision_recall_k']} for precision/recall.")
    seg = metrics.get("segmentation")
    if seg:
        lines += ["", "| DeepLabv3+ trained on | mIoU on held-out real |", "|---|---|"]
        lines += [f"| {name} | {seg[name]['miou']:.3f} |" for name in ("synthetic", "real", "real+synthetic",
                                                                       "majority_baseline")]
        lines.append(f"\n{settings['segmentation']['iou']}; {seg['test_samples']} test images, "
                     f"{settings['segmentation']['epochs']} epochs at {settings['segmentation']['size']} px.")
    memo = metrics.get("memorization")
    memo_text = None
    if memo:
        memo_text = (f"{memo['flagged']} of {settings['synthetic_samples']} synthetic images flagged as near-copies "
                     f"(nearest real image or crop closer than the 1st percentile of real-to-real nearest-neighbour "
                     f"distances; encoder {memo['encoder']} and 32 × 32 pixel space). Median nearest-real distance "
                     f"({memo['encoder']}): {memo['nn_distance_quantiles']['encoder']['q50']:.4g}, "
                     f"threshold {memo['threshold']:.4g}.")
    return "\n".join(lines), memo_text


def update_cards(options: EvaluateOptions, metrics: dict) -> None:
    """Results into the synthetic bundle's card (a local folder) and the model card's model-index."""
    from htd_toolkit.publish.dataset import read_bundle_manifest, write_card
    from htd_toolkit.publish.hub import published_repos

    folder = Path(options.synthetic)
    if not folder.exists():
        raise UserError(f"--update-card needs the synthetic set as a local bundle folder, not {options.synthetic}")
    manifest = read_bundle_manifest(folder)
    text, memo = evaluation_text(metrics)
    manifest["evaluation"] = {"text": text, "memorization": memo}
    write_manifest(folder, manifest)
    figure = Path(options.out).with_name("memorization.png")
    if memo and figure.exists():
        (folder / "assets").mkdir(exist_ok=True)
        write_atomic(folder / "assets" / "memorization.png", figure.read_bytes())
    write_card(folder, manifest, repo_id=published_repos(folder).get("dataset"))
    if options.model is not None:
        update_model_index(Path(options.model), metrics, manifest)


def update_model_index(model: Path, metrics: dict, manifest: dict) -> None:
    from huggingface_hub import EvalResult, ModelCard

    path = model / "README.md"
    if not path.exists():
        raise UserError(f"{model}: no model card (README.md) to update")
    card = ModelCard.load(path)
    dataset = manifest.get("source", {}).get("maps", {}).get("name") or "real"
    results = [EvalResult(task_type="image-segmentation", dataset_type=dataset, dataset_name=dataset,
                          metric_type="frechet_distance", metric_name=f"FD ({name})", metric_value=value)
               for name, value in metrics["fd"].items()]
    seg = metrics.get("segmentation")
    if seg:
        results.append(EvalResult(task_type="image-segmentation", dataset_type=dataset, dataset_name=dataset,
                                  metric_type="mean_iou", metric_name="DeepLabv3+ mIoU, trained on synthetic only",
                                  metric_value=seg["synthetic"]["miou"]))
    card.data.eval_results = results
    card.data.model_name = card.data.model_name or model.name
    card.save(path)
