"""Model and dataset cards from the Jinja templates in `dataset_cards/`, as `huggingface_hub` cards."""

from __future__ import annotations

import re
import shutil
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

SD_LICENSES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
               "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
               "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
               "stabilityai/stable-diffusion-2-1": "openrail++", "stabilityai/stable-diffusion-2-1-base": "openrail++"}
# Bases whose images must not be taken for realistic tissue: the cards say so.
BASE_NOTES = {"local:he_base_cc0": (
    "The base is htd-toolkit's toy H&E base: a 3.8 M-parameter Stable-Diffusion-layout model trained from "
    "scratch on one CC0 slide (CMU-1-Small-Region, 64-px patches at 1 µm/px) on a CPU. It shows the method "
    "at work (images follow their maps and crops); it is not a realistic generator.")}
MODEL_TAGS = ["histopathology", "htd-toolkit", "controlnet", "lora", "stable-diffusion", "diffusers",
              "text-to-image", "image-to-image", "synthetic-data"]


def template(name: str) -> str:
    return resources.files("htd_toolkit.dataset_cards").joinpath(name).read_text()


def write_model_card(folder: Path, config, manifest: dict, args, grid: Path | None = None,
                     repo_id: str | None = None, metrics: str | None = None) -> ModelCard:
    """README.md of a model folder: metadata (base_model, library_name, tags, datasets) and how to load it."""
    on_hub = not config.base_model.startswith("local:")
    data = ModelCardData(
        license=SD_LICENSES.get(config.base_model, "other"), library_name="diffusers", tags=MODEL_TAGS,
        base_model=config.base_model if on_hub else None,
        datasets=[config.training_data] if config.training_data and "/" in config.training_data else None,
        pipeline_tag="image-to-image")
    grid_link = None
    if grid is not None:
        (folder / "assets").mkdir(exist_ok=True)
        shutil.copy(grid, folder / "assets" / "validation_grid.png")
        grid_link = "assets/validation_grid.png"
    card = ModelCard.from_template(
        data, template_str=template("model_card.md.j2"), title=f"HTD model: {config.training_data or 'histopathology'}",
        config=config, base_link=f"https://huggingface.co/{config.base_model}" if on_hub else None,
        train_samples=manifest.get("splits", {}).get("train", 0), steps=args.max_train_steps,
        batch=args.train_batch_size, accumulation=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lora_learning_rate=args.lora_learning_rate, seed=args.seed, grid=grid_link,
        base_note=BASE_NOTES.get(config.base_model),
        repo_id=repo_id or args.hub_model_id or Path(args.output_dir).name, metrics=metrics)
    card.save(folder / "README.md")
    return card


LOAD_TARGET = re.compile(r'HTDPipeline\.from_pretrained\("([^"]+)"\)')


def name_repo_in_model_card(folder: Path, repo_id: str) -> None:
    """Make the card's "Use" lines load `repo_id` (the model's repo once pushed), leaving the rest of a
    card the user may have edited as it is."""
    path = Path(folder) / "README.md"
    text = path.read_text() if path.is_file() else ""
    found = LOAD_TARGET.search(text)
    if found is None or found.group(1) == repo_id:
        return
    old = found.group(1)
    path.write_text(text.replace(f'from_pretrained("{old}"', f'from_pretrained("{repo_id}"')
                    .replace(f"--model {old} ", f"--model {repo_id} "))


HUB_LICENSES = {"cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0",
                "apache-2.0", "mit", "openrail", "creativeml-openrail-m", "other"}
DATASET_TAGS = ["histopathology", "synthetic", "webdataset", "image-segmentation", "pathology", "htd-toolkit",
                "semantic-segmentation"]


def license_fields(license_id: str | None) -> dict:
    """The card's licence in the Hub's terms: a Hub licence id, or `other` with a name and a link."""
    if license_id in HUB_LICENSES and license_id != "other":
        return {"license": license_id}
    name = re.sub(r"[^a-z0-9.]+", "-", (license_id or "unknown").lower()).strip("-") or "unknown"
    return {"license": "other", "license_name": name, "license_link": "README.md#source-data-and-licence"}


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "10M<n<100M"


def dataset_assets(manifest: dict, samples: list) -> dict[str, bytes]:
    """The card's pictures as PNG bytes by repo path: assets/sample_grid.png (image | mask overlay) and
    assets/heterogeneity.png."""
    import io

    from PIL import Image

    from htd_toolkit.classes import class_specs
    from htd_toolkit.publish.figures import bar_chart, sample_grid

    def png(array) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    specs = class_specs(manifest["classes"])
    histogram = manifest["stats"]["dominant_fraction_histogram"]
    chart = bar_chart(histogram["counts"], histogram["edges"], "dominant tissue class: fraction of the tissue")
    return {"assets/sample_grid.png": png(sample_grid(samples, specs)), "assets/heterogeneity.png": png(chart)}


def write_dataset_assets(out: Path, manifest: dict, samples: list) -> None:
    """assets/sample_grid.png and assets/heterogeneity.png in the bundle folder."""
    (out / "assets").mkdir(exist_ok=True)
    for name, data in dataset_assets(manifest, samples).items():
        (out / name).write_bytes(data)


def dataset_card(manifest: dict, repo_id: str | None = None, model_repo: str | None = None,
                 evaluation: str | None = None, memorization: str | None = None):
    """The bundle's card (a `huggingface_hub.DatasetCard`) from its manifest."""
    from huggingface_hub import DatasetCard, DatasetCardData

    source = manifest["source"]
    n = manifest["splits"]["train"]
    model = source.get("model", "")
    model_id, _, revision = model.partition("@")
    on_hub = not model_id.startswith("local:")
    if model_repo:
        model_id, revision, on_hub = model_repo, "", True
    pretty = f"HTD synthetic {source.get('maps', {}).get('name') or 'histopathology'}"
    data = DatasetCardData(
        **license_fields(source.get("license")), task_categories=["image-segmentation", "image-to-image"],
        task_ids=["semantic-segmentation"], tags=DATASET_TAGS,
        size_categories=[size_category(n)], source_datasets=source.get("source_datasets") or None,
        pretty_name=pretty,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.tar"}]}])
    classes = [{**c, **stat} for c, stat in zip(manifest["classes"], manifest["stats"]["per_class"], strict=True)]
    stored = manifest.get("evaluation") or {}
    evaluation = evaluation or stored.get("text")
    memorization = memorization or stored.get("memorization")
    return DatasetCard.from_template(
        data, template_str=template("dataset_card.md.j2"), pretty_name=pretty, num_samples=n, manifest=manifest,
        repo_id=repo_id or "ORG/NAME", classes=classes, histogram=manifest["stats"]["dominant_fraction_histogram"],
        model_id=model_id, model_revision=revision, model_link=f"https://huggingface.co/{model_id}" if on_hub else None,
        maps_split=source.get("maps", {}).get("split"), maps_name=source.get("maps", {}).get("name"),
        config=manifest["config"], source_datasets=source.get("source_datasets") or [], license=source.get("license"),
        evaluation=evaluation, memorization=memorization, reader_study=(manifest.get("reader_study") or {}).get("text"),
        base_note=BASE_NOTES.get(source.get("base_model", "")))


def prepared_card(manifest: dict, repo_id: str) -> bytes:
    """The card of prepared training data pushed as a dataset repo: data files per split (the crop bank
    is not a split), real-data warning, class table."""
    from huggingface_hub import DatasetCard, DatasetCardData

    source = manifest.get("source") or {}
    splits = {name: n for name, n in (manifest.get("splits") or {}).items() if n}
    name = source.get("name") or "histopathology"
    pretty = f"htd-toolkit training data: {name}"
    data = DatasetCardData(
        **license_fields(source.get("license")), task_categories=["image-segmentation"],
        task_ids=["semantic-segmentation"], tags=["histopathology", "webdataset", "htd-toolkit", "pathology"],
        size_categories=[size_category(sum(splits.values()))], pretty_name=pretty,
        configs=[{"config_name": "default",
                  "data_files": [{"split": split, "path": f"data/{split}-*.tar"} for split in splits]}])
    card = DatasetCard.from_template(
        data, template_str=template("prepared_card.md.j2"), pretty_name=pretty, manifest=manifest, repo_id=repo_id,
        slides=len((manifest.get("stats") or {}).get("slides") or []) or "several", source_name=name,
        license=source.get("license"), splits=splits, classes=manifest.get("classes") or [])
    return str(card).encode()
