"""Training input: the prepared shards streamed with webdataset, crops sampled online per sample.

With a latent cache (`--cache_latents`) each sample brings its precomputed VAE latents instead of its
pixels, and flips/rotations are off, because the VAE's latents do not rotate with the image.

`stain_jitter` (HED scale, shift) recolours the image *before* its crops are cut, so image and crops share
one random stain: the map cannot predict it and the crops can, which teaches the crop branches to carry a
region's absolute look (colour, not only its contrast with the other regions) to the generated image.

Every random draw is a function of (seed, epoch, sample key), and the shard order and shuffle buffer
of (seed, epoch), so a run resumed at step N sees exactly the batches an uninterrupted run would.
Processes (`rank`/`world_size`) and DataLoader workers take interleaved samples of one shared order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from htd_toolkit.data.crops import SMALLEST_SIDE, crop_side_range, sample_crop_box
from htd_toolkit.data.folder import check_mask, read_manifest, shard_files
from htd_toolkit.data.labels import classes_present
from htd_toolkit.data.shards import IMAGE_EXTENSIONS, MASK, one_channel, open_image, sample_member
from htd_toolkit.data.stain import stain_jitter
from htd_toolkit.errors import UserError
from htd_toolkit.models.conditioning import Conditioning, conditioning_for, paste_box, to_unit_range
from htd_toolkit.seeding import derive_seed


class TrainingStream(IterableDataset):
    """Samples of one split as tensors: image, class map, crop slots, (canvas)."""

    def __init__(self, folder: str | Path, resolution: int, max_crops: int, crop_size: int, crop_mode: str,
                 split: str = "train", seed: int = 0, shuffle_buffer: int = 256, rank: int = 0, world_size: int = 1,
                 augment: bool = True, latents: dict | None = None, stain_jitter: tuple[float, float] = (0.0, 0.0)):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        shards = shard_files(self.folder, manifest, split, verify=True)  # every rank reads every shard anyway
        self.urls = [str(path) for _, path in shards]  # checked plain files: webdataset opens them as files
        self.num_samples = sum(s["samples"] for s, _ in shards)
        if not self.num_samples:
            raise UserError(f"{self.folder}: the {split} split is empty")
        self.patch_size = manifest.get("config", {}).get("patch_size", resolution)
        self.crop_sides = crop_side_range(self.patch_size, manifest.get("config", {}).get("crop_size"))
        self.num_classes = len(manifest["classes"])
        self.resolution, self.max_crops, self.crop_size, self.crop_mode = resolution, max_crops, crop_size, crop_mode
        self.seed, self.shuffle_buffer, self.rank, self.world_size = seed, shuffle_buffer, rank, world_size
        self.latents = latents  # key → cached VAE latents: then images are not decoded into the batch
        self.augment = augment and latents is None  # the VAE is not flip/rotation-equivariant
        self.stain_jitter = stain_jitter if self.augment and any(stain_jitter) else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def limit(self) -> int:
        """Samples used per epoch: a multiple of the process count, so every process gets as many."""
        return self.num_samples // self.world_size * self.world_size

    def __len__(self) -> int:
        """Samples this process sees per epoch."""
        return self.limit // self.world_size

    def batches_per_epoch(self, batch_size: int, num_workers: int) -> int:
        """Batches a DataLoader with `num_workers` workers yields per epoch on this process."""
        workers = max(1, num_workers)
        slots = self.world_size * workers
        return sum(-(-len(range(self.rank * workers + w, self.limit, slots)) // batch_size) for w in range(workers))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, "shards"))
        urls = [self.urls[i] for i in rng.permutation(len(self.urls))]
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(),
            _every(slot, slots, self.limit),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=derive_seed(self.seed, self.epoch, slot)),
            wds.map(self.transform),
        )
        return iter(pipeline)

    def transform(self, sample: dict) -> dict:
        key = sample["__key__"]
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key))
        image = _decode(sample, IMAGE_EXTENSIONS).convert("RGB")
        labels = _decode(sample, (MASK,))
        if image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution,) * 2, Image.Resampling.BICUBIC)
            labels = labels.resize((self.resolution,) * 2, Image.Resampling.NEAREST)
        shard = sample.get("__url__", self.folder)
        image, labels = np.asarray(image), one_channel(np.asarray(labels), f"{shard} ({key}.{MASK})")
        check_mask(labels, self.num_classes, f"{shard} ({key})")
        if self.augment:
            image, labels = _flip_rotate(image, labels, rng)
        if self.stain_jitter:
            image = stain_jitter(image, rng, *self.stain_jitter)
        crops = self.sample_crops(image, labels, rng) if self.crop_mode != "none" else {}
        cond = conditioning_for(labels, crops, self.crop_mode, self.max_crops, self.crop_size)
        if self.latents is not None:
            return {"__key__": key, "latents": self.latents[key], "conditioning": cond}
        return {"__key__": key, "pixel_values": to_unit_range(image), "conditioning": cond}

    def sample_crops(self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
        """One crop per class present (sides as the crop bank's, `crop_side_range`, at training scale),
        inside that class's region; the largest square inside it when none of those sides fits."""
        scale = self.resolution / self.patch_size
        low, high = (max(SMALLEST_SIDE, round(side * scale)) for side in self.crop_sides)
        crops = {}
        for cls in classes_present(labels, self.max_crops):
            region = labels == cls
            x, y, side = sample_crop_box(region, rng, low, high) or paste_box(region)
            crops[cls] = image[y:y + side, x:x + side]
        return crops


def _every(slot: int, slots: int, limit: int):
    def select(samples):
        for index, sample in enumerate(samples):
            if index >= limit:
                return
            if index % slots == slot:
                yield sample
    return select


def _decode(sample: dict, extensions: tuple[str, ...]) -> Image.Image:
    """The first of `extensions` a webdataset sample has, decoded; one line naming its shard and member otherwise."""
    shard, key = sample.get("__url__", "a shard"), sample["__key__"]
    ext, data = sample_member(sample, extensions, f"{shard} ({key})")
    return open_image(data, f"{shard} ({key}.{ext})")


def _flip_rotate(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """The same random flip and quarter turn for image and mask (tissue has no orientation)."""
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    image, labels = np.rot90(image, turns), np.rot90(labels, turns)
    if flip:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def collate_samples(items: list[dict]) -> dict:
    """A training batch (the DataLoader's `collate_fn`): keys as a list, pixels or latents stacked, the
    conditions stacked into one `Conditioning`."""
    batch = {"__key__": [item["__key__"] for item in items],
             "conditioning": Conditioning.stack([item["conditioning"] for item in items])}
    for name in ("pixel_values", "latents"):
        if name in items[0]:
            batch[name] = torch.stack([item[name] for item in items])
    return batch
