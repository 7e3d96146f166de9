"""Image sets in the sample schema, from a dataset folder or a Hub dataset id.

A set is decoded once into one preallocated uint8 array (no list of arrays stacked afterwards, which
doubles the peak); above `MEMMAP_BYTES` the array is a memory map on an unlinked temporary file in
the htd-toolkit cache, so 50,000 images at 512 px (39 GB) do not need 39 GB of RAM.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.classes import FINGERPRINT, check_same_classes, check_same_names, names_from_id2label
from htd_toolkit.config import cache_dir
from htd_toolkit.data.folder import check_mask, read_manifest, shard_files
from htd_toolkit.data.shards import IMAGE_EXTENSIONS, MASK, decode_sample, read_tar
from htd_toolkit.errors import UserError

MEMMAP_BYTES = 2 * 2**30


@dataclass
class ImageSet:
    name: str
    keys: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8
    classes: list[str]
    fingerprint: dict | None = None  # the folder's class fingerprint (htd_toolkit/classes.py); None from the Hub


def load_set(source: str | Path, split: str = "train", limit: int | None = None) -> ImageSet:
    """All samples of `split` (at most `limit`) from a local dataset folder or a Hub dataset repo."""
    path = Path(source)
    if path.exists():
        return _load_folder(path, split, limit)
    return _load_hub(str(source), split, limit)


def _load_folder(folder: Path, split: str, limit: int | None) -> ImageSet:
    manifest = read_manifest(folder)
    shards = shard_files(folder, manifest, split, verify=True)
    count = sum(shard["samples"] for shard, _ in shards)

    def samples() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for _, path in shards:
            for key, members in read_tar(path):
                image, mask = decode_sample(dict(members), path, key)
                check_mask(mask, len(manifest["classes"]), f"{path} ({key})")
                yield key, image, mask

    classes = [c["name"] for c in manifest["classes"]]
    loaded = _collect(str(folder), split, min(count, limit or count), samples(), classes)
    loaded.fingerprint = manifest.get(FINGERPRINT)
    return loaded


def _load_hub(repo_id: str, split: str, limit: int | None) -> ImageSet:
    from datasets import load_dataset
    from huggingface_hub import hf_hub_download

    from htd_toolkit.downloads import checked_revision

    try:
        revision = checked_revision(repo_id, "dataset")
        rows = load_dataset(repo_id, split=split, revision=revision)
        id2label = json.loads(Path(hf_hub_download(repo_id, "id2label.json", repo_type="dataset",
                                                   revision=revision)).read_text())
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{repo_id}: not a local folder, and not loadable from the Hub ({type(err).__name__})") from err
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    image_column = next((c for c in IMAGE_EXTENSIONS if c in rows.column_names), None)
    if image_column is None or MASK not in rows.column_names:
        missing = MASK if image_column else f"image ({', '.join(IMAGE_EXTENSIONS)})"
        raise UserError(f"{repo_id}: no {missing} column in the {split} split (columns: "
                        f"{', '.join(rows.column_names)}); not the sample schema")
    classes = names_from_id2label(id2label, repo_id)
    rows = encoded_images(rows, (image_column, MASK))

    def samples() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for index, row in enumerate(rows):
            key = row.get("__key__") or f"row {index}"  # a Parquet dataset has no WebDataset keys
            members = {column: image_bytes(row[column]) for column in (image_column, MASK) if row[column] is not None}
            image, mask = decode_sample(members, repo_id, key)  # an empty cell: one line naming the member
            check_mask(mask, len(classes), f"{repo_id} ({key})")
            yield key, image, mask

    return _collect(repo_id, split, len(rows), samples(), classes)


def encoded_images(rows, columns: tuple[str, ...]):
    """`rows` with `columns` left encoded, so that every image is decoded by the toolkit's own reader (its
    format allow-list, its size limit read from the header before decoding), not by the datasets library."""
    from datasets import Image as ImageFeature

    for column in columns:
        rows = rows.cast_column(column, ImageFeature(decode=False))
    return rows


def image_bytes(cell: dict) -> bytes:
    """The encoded bytes of an undecoded datasets Image cell."""
    return cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()


def allocate(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array: in memory, or memory-mapped on a temporary file when large."""
    if int(np.prod(shape)) <= MEMMAP_BYTES:
        return np.empty(shape, np.uint8)
    folder = cache_dir() / "evaluate-tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return np.memmap(tempfile.TemporaryFile(dir=folder), np.uint8, mode="w+", shape=shape)  # unlinked already


def _collect(name: str, split: str, count: int, samples: Iterable, classes: list[str]) -> ImageSet:
    keys, images, masks = [], None, None
    for index, (key, image, mask) in enumerate(samples):
        if index == count:
            break
        if images is None:
            images, masks = allocate((count, *image.shape)), allocate((count, *mask.shape))
        if image.shape != images.shape[1:]:
            raise UserError(f"{name}: images of different sizes {images.shape[1:]} and {image.shape}")
        if mask.shape != image.shape[:2]:
            raise UserError(f"{name} ({key}): mask of {mask.shape[1]} x {mask.shape[0]} for an image of "
                            f"{image.shape[1]} x {image.shape[0]}")
        images[index], masks[index] = image, mask
        keys.append(key)
    if not keys:
        raise UserError(f"{name}: no samples in the {split} split")
    return ImageSet(name, keys, images[:len(keys)], masks[:len(keys)], classes)


def check_compatible(real: ImageSet, synthetic: ImageSet) -> None:
    check_same_names(real.classes, real.name, synthetic.classes, synthetic.name)
    if real.fingerprint or synthetic.fingerprint:
        check_same_classes(real.fingerprint, real.name, synthetic.fingerprint, synthetic.name)
    if real.images.shape[1:] != synthetic.images.shape[1:]:
        raise UserError(f"image sizes differ: {real.name} is {real.images.shape[2]}x{real.images.shape[1]}, "
                        f"{synthetic.name} is {synthetic.images.shape[2]}x{synthetic.images.shape[1]} "
                        "(pass --size N to compare both at N x N)")


def resized(images: ImageSet, size: int) -> ImageSet:
    """The set at size x size: images bicubic, masks nearest (class ids intact)."""
    if images.images.shape[1:3] == (size, size):
        return images
    count = len(images.images)
    pictures, masks = allocate((count, size, size, 3)), allocate((count, size, size))
    for index, (picture, mask) in enumerate(zip(images.images, images.masks, strict=True)):
        pictures[index] = np.asarray(Image.fromarray(picture).resize((size, size), Image.Resampling.BICUBIC))
        masks[index] = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    return ImageSet(images.name, images.keys, pictures, masks, images.classes, images.fingerprint)
