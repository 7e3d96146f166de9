"""Finishing and publishing a bundle: card and pictures, verification, the dataset push (and the model's)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from htd_toolkit.data.folder import MANIFEST, shard_file
from htd_toolkit.data.shards import decode_image, image_member, read_tar
from htd_toolkit.errors import UserError
from htd_toolkit.publish.cards import dataset_card, write_dataset_assets
from htd_toolkit.publish.hub import push_folder

GRID_SAMPLES = 8


def read_bundle_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.exists():
        raise UserError(f"{out}: not a bundle (no {MANIFEST}); run `htd-toolkit generate` first")
    return json.loads(path.read_text())


def verify_bundle(out: Path, manifest: dict) -> None:
    """Every shard present with the sha256 the manifest names: nothing partial gets published."""
    for shard in manifest["shards"]:
        path = shard_file(Path(out), shard)
        if hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
            raise UserError(f"{path}: missing or different from the manifest; regenerate before pushing")


def first_samples(out: Path, manifest: dict, count: int = GRID_SAMPLES) -> list[tuple[np.ndarray, np.ndarray]]:
    samples = []
    for shard in manifest["shards"]:
        for _, members in read_tar(shard_file(Path(out), shard)):
            members = dict(members)
            samples.append((decode_image(image_member(members), "RGB"), decode_image(members["mask.png"])))
            if len(samples) == count:
                return samples
    return samples


def write_card(out: Path, manifest: dict, repo_id: str | None = None, model_repo: str | None = None) -> None:
    write_dataset_assets(out, manifest, first_samples(out, manifest))
    dataset_card(manifest, repo_id=repo_id, model_repo=model_repo).save(Path(out) / "README.md")


def link_model_card(model_folder: Path, dataset_repo: str) -> None:
    """Name the bundle in the model card's `datasets` and body, so the two cards link each other."""
    from huggingface_hub import ModelCard

    path = Path(model_folder) / "README.md"
    if not path.exists():
        return
    card = ModelCard.load(path)
    card.data.datasets = sorted({*(card.data.datasets or []), dataset_repo})
    line = f"Synthetic dataset made with this model: [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo})"
    if line not in card.text:
        card.text = card.text.rstrip() + f"\n\n{line}\n"
    card.save(path)


def push_bundle(out: Path, repo_id: str, public: bool = False, model: str | None = None,
                model_repo: str | None = None) -> dict[str, str]:
    """Push the bundle (and, when `model` is a local folder, the model) with cards that link each other."""
    out = Path(out)
    manifest = read_bundle_manifest(out)
    verify_bundle(out, manifest)
    urls = {}
    if model is not None:
        model_repo = model_repo or f"{repo_id}-model"
        if Path(model).exists():
            link_model_card(Path(model), repo_id)
            urls["model"] = push_folder(Path(model), model_repo, "model", not public, "Upload HTD model")
        else:
            model_repo = model  # already on the Hub
    if manifest.get("published_as") != repo_id:
        manifest["published_as"] = repo_id
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(out, manifest, repo_id=repo_id, model_repo=model_repo)
    urls["dataset"] = push_folder(out, repo_id, "dataset", not public, "Upload HTD synthetic bundle")
    return urls
