"""Model and dataset cards from the Jinja templates in `dataset_cards/`, as `huggingface_hub` cards."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

SD_LICENSES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
               "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
               "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
               "stabilityai/stable-diffusion-2-1": "openrail++", "stabilityai/stable-diffusion-2-1-base": "openrail++"}
MODEL_TAGS = ["histopathology", "htd-toolkit", "controlnet", "lora", "stable-diffusion", "diffusers",
              "text-to-image", "image-to-image", "synthetic-data"]


def template(name: str) -> str:
    return resources.files("dataset_cards").joinpath(name).read_text()


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
        repo_id=repo_id or args.hub_model_id or str(folder), metrics=metrics)
    card.save(folder / "README.md")
    return card
