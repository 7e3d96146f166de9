"""Finishing and publishing a bundle: card and pictures, verification, the dataset push (and the model's);
and the push of a prepared folder as a private training dataset. What each push uploads is the folder's
allow-list (`publish.contents`); the folder is checked before anything in it is written, and where it
was published is recorded (`.work/published.json`) only once the commit has succeeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from htd_toolkit.data.folder import read_manifest, shard_file
from htd_toolkit.data.shards import decode_sample, read_tar
from htd_toolkit.errors import UserError
from htd_toolkit.generate.writer import GRID_SAMPLES
from htd_toolkit.publish.cards import dataset_card, prepared_card, write_dataset_assets
from htd_toolkit.publish.contents import folder_kind
from htd_toolkit.publish.hub import check_visibility, push_folder, push_model


def read_bundle_manifest(out: Path) -> dict:
    kind = folder_kind(Path(out))
    if kind != "bundle":
        raise UserError(f"{out}: {KIND_HINTS[kind]}")
    return read_manifest(Path(out))


KIND_HINTS = {"prepared": "prepared training data (real patches), not a synthetic bundle; "
                          "pass --training-data to publish it as a private training dataset",
              "model": "a model folder, not a bundle; `htd-toolkit push` it to a model repo",
              "bundle": "a synthetic bundle, not prepared training data"}


def verify_bundle(out: Path, manifest: dict, records: list[dict] | None = None) -> None:
    """Every shard present with the sha256 the manifest names: nothing partial gets published."""
    for shard in manifest["shards"] if records is None else records:
        shard_file(Path(out), shard, verify=True)


def first_samples(out: Path, manifest: dict, count: int = GRID_SAMPLES, source=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The bundle's first `count` samples (image, mask), read from `source(record)` (default: the shard file)."""
    samples = []
    for shard in manifest["shards"]:
        for key, members in read_tar(source(shard) if source else shard_file(Path(out), shard)):
            samples.append(decode_sample(dict(members), shard["path"], key))
            if len(samples) == count:
                return samples
    return samples


def write_card(out: Path, manifest: dict, repo_id: str | None = None, model_repo: str | None = None) -> None:
    write_dataset_assets(out, manifest, first_samples(out, manifest))
    dataset_card(manifest, repo_id=repo_id, model_repo=model_repo).save(Path(out) / "README.md")


def link_model_card(model_folder: Path, dataset_repo: str) -> None:
    """Name the bundle in the model card's body under its own heading, so the two cards link each other
    (the card's `datasets` metadata stays the training data, as the Hub reads it)."""
    from huggingface_hub import ModelCard

    path = Path(model_folder) / "README.md"
    if not path.exists():
        return
    card = ModelCard.load(path)
    heading = "## Synthetic datasets made with this model"
    line = f"- [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo})"
    if line not in card.text:
        if heading not in card.text:
            card.text = card.text.rstrip() + f"\n\n{heading}\n"
        card.text = card.text.rstrip() + f"\n{line}\n"
    card.save(path)


def card_model_repo(repo_id: str, model: str | None, model_repo: str | None) -> str | None:
    """The model repo a bundle's card names: the one a local `model` is pushed to, or `model` on the Hub."""
    if model is None:
        return None
    return (model_repo or f"{repo_id}-model") if Path(model).exists() else model


def push_model_of(model: str, repo_id: str, public: bool, model_repo: str | None = None) -> str | None:
    """Push a local model folder beside its bundle, the two cards linking each other; None for a Hub model."""
    if not Path(model).exists():
        return None
    if folder_kind(Path(model)) != "model":
        raise UserError(f"{model}: not a model folder (no htd_config.json)")
    link_model_card(Path(model), repo_id)
    return push_model(Path(model), card_model_repo(repo_id, model, model_repo), private=not public)


def push_bundle(out: Path, repo_id: str, public: bool = False, model: str | None = None,
                model_repo: str | None = None) -> dict[str, str]:
    """Push the bundle (and, when `model` is a local folder, the model) with cards that link each other."""
    out = Path(out)
    manifest = read_bundle_manifest(out)
    verify_bundle(out, manifest)
    if model is not None and Path(model).exists() and folder_kind(Path(model)) != "model":
        raise UserError(f"{model}: not a model folder (no htd_config.json)")
    check_visibility(repo_id, "dataset", public)  # before the model is pushed
    urls = {}
    if model is not None and (url := push_model_of(model, repo_id, public, model_repo)):
        urls["model"] = url
    write_card(out, manifest, repo_id=repo_id, model_repo=card_model_repo(repo_id, model, model_repo))
    urls["dataset"] = push_folder(out, repo_id, "dataset", not public, "Upload HTD synthetic bundle")
    return urls


def push_prepared(folder: Path, repo_id: str, public: bool = False) -> str:
    """Publish prepared training data (real patches, crop bank) as a dataset repo, private unless `public`.
    A card is generated for the upload (not written into the folder) when the folder has none."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind != "prepared":
        raise UserError(f"{folder}: {KIND_HINTS[kind]}")
    manifest = read_manifest(folder)
    verify_bundle(folder, manifest, manifest["shards"] + (manifest.get("crop_bank") or []))
    generated = None if (folder / "README.md").is_file() else {"README.md": prepared_card(manifest, repo_id)}
    url = push_folder(folder, repo_id, "dataset", not public, "Upload htd-toolkit prepared training data",
                      generated=generated)
    return url
