"""Image sets in the sample schema, from a dataset folder or a Hub dataset id."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.data.shards import read_tar
from htd_toolkit.errors import UserError


@dataclass
class ImageSet:
    name: str
    keys: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8
    classes: list[str]


def _decode(data: bytes, mode: str | None = None) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    return np.asarray(image.convert(mode) if mode else image)


def load_set(source: str | Path, split: str = "train", limit: int | None = None) -> ImageSet:
    """All samples of `split` (at most `limit`) from a local dataset folder or a Hub dataset repo."""
    path = Path(source)
    if path.exists():
        return _load_folder(path, split, limit)
    return _load_hub(str(source), split, limit)


def _load_folder(folder: Path, split: str, limit: int | None) -> ImageSet:
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{folder}: not a dataset folder (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    keys, images, masks = [], [], []
    for shard in manifest["shards"]:
        if shard.get("split", "train") != split:
            continue
        for key, members in read_tar(folder / shard["path"]):
            members = dict(members)
            image = next(members[ext] for ext in ("png", "jpg", "webp") if ext in members)
            keys.append(key)
            images.append(_decode(image, "RGB"))
            masks.append(_decode(members["mask.png"]))
            if limit and len(keys) >= limit:
                break
        if limit and len(keys) >= limit:
            break
    return _build(str(folder), keys, images, masks, [c["name"] for c in manifest["classes"]], split)


def _load_hub(repo_id: str, split: str, limit: int | None) -> ImageSet:
    from datasets import load_dataset
    from huggingface_hub import hf_hub_download

    try:
        rows = load_dataset(repo_id, split=split)
        id2label = json.loads(Path(hf_hub_download(repo_id, "id2label.json", repo_type="dataset")).read_text())
    except Exception as err:
        raise UserError(f"{repo_id}: not a local folder, and not loadable from the Hub ({type(err).__name__})") from err
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    image_column = next(c for c in ("png", "jpg", "webp") if c in rows.column_names)
    keys = list(rows["__key__"])
    images = [np.asarray(r.convert("RGB")) for r in rows[image_column]]
    masks = [np.asarray(m) for m in rows["mask.png"]]
    classes = [id2label[str(i)] for i in range(len(id2label))]
    return _build(repo_id, keys, images, masks, classes, split)


def _build(name: str, keys, images, masks, classes, split) -> ImageSet:
    if not images:
        raise UserError(f"{name}: no samples in the {split} split")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise UserError(f"{name}: images of different sizes {sorted(shapes)[:3]}")
    return ImageSet(name, keys, np.stack(images), np.stack(masks), classes)


def check_compatible(real: ImageSet, synthetic: ImageSet) -> None:
    if real.classes != synthetic.classes:
        raise UserError(f"class lists differ: {real.name} has {real.classes}, {synthetic.name} has {synthetic.classes}")
    if real.images.shape[1:] != synthetic.images.shape[1:]:
        raise UserError(f"image sizes differ: {real.name} is {real.images.shape[2]}x{real.images.shape[1]}, "
                        f"{synthetic.name} is {synthetic.images.shape[2]}x{synthetic.images.shape[1]} "
                        "(pass --size N to compare both at N x N)")


def resized(images: ImageSet, size: int) -> ImageSet:
    """The set at size x size: images bicubic, masks nearest (class ids intact)."""
    if images.images.shape[1:3] == (size, size):
        return images
    pictures = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.BICUBIC))
                         for i in images.images])
    masks = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.NEAREST))
                      for m in images.masks])
    return ImageSet(images.name, images.keys, pictures, masks, images.classes)
