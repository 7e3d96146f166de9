"""Training input: the prepared shards streamed with webdataset, crops sampled online per sample.

With a latent cache (`--cache_latents`) each sample brings its precomputed VAE latents instead of its
pixels, and flips/rotations are off, because the VAE's latents do not rotate with the image.

`stain_jitter` (HED scale, shift) recolours the image *before* its crops are cut, so image and crops share
one random stain: the map cannot predict it and the crops can, which teaches the crop branches to carry a
region's absolute look (colour, not only its contrast with the other regions) to the generated image.

Every random draw is a function of (seed, epoch, sample key), and the shard order and shuffle buffer
of (seed, epoch), so a run resumed at step N sees exactly the batches an uninterrupted run would.
Every process and DataLoader worker reads the one shuffled order of the epoch and takes its share by
global batch: the order is cut into global batches of `batch_size` x `world_size` samples, and rank r
takes the r-th `batch_size` of each (worker w of W the global batches w, w + W, ...). So N processes at
batch b see, step by step, the samples one process at batch N x b sees, and the same draws: what the
data adds to the process-count independence of the recipe (README, "Processes").
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
                 augment: bool = True, latents: dict | None = None, stain_jitter: tuple[float, float] = (0.0, 0.0),
                 batch_size: int = 1, max_samples: int | None = None):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        shards = shard_files(self.folder, manifest, split, verify=True)  # every rank reads every shard anyway
        self.urls = [str(path) for _, path in shards]  # checked plain files: webdataset opens them as files
        self.shard_samples = [s["samples"] for s, _ in shards]
        self.num_samples = sum(self.shard_samples)
        if not self.num_samples:
            raise UserError(f"{self.folder}: the {split} split is empty")
        self.subset = None  # indexes (in the manifest's shard order) of the samples kept by max_samples
        if max_samples is not None and max_samples < self.num_samples:
            rng = np.random.default_rng(derive_seed(seed, "max_train_samples"))
            self.subset = frozenset(rng.choice(self.num_samples, max_samples, replace=False).tolist())
            self.num_samples = max_samples
        self.patch_size = manifest.get("config", {}).get("patch_size", resolution)
        self.crop_sides = crop_side_range(self.patch_size, manifest.get("config", {}).get("crop_size"))
        self.num_classes = len(manifest["classes"])
        self.resolution, self.max_crops, self.crop_size, self.crop_mode = resolution, max_crops, crop_size, crop_mode
        self.seed, self.shuffle_buffer, self.rank, self.world_size = seed, shuffle_buffer, rank, world_size
        self.batch_size = batch_size  # the DataLoader's: samples are shared out by global batch
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
        """Batches a DataLoader with `batch_size` and `num_workers` workers yields per epoch on this process."""
        workers = max(1, num_workers)
        per_worker = [0] * workers
        for batch in range(-(-self.limit // self.global_batch)):
            per_worker[batch % workers] += self.local_batch(batch)
        return sum(-(-count // batch_size) for count in per_worker)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def local_batch(self, batch: int) -> int:
        """Samples each process takes of global batch `batch` (the epoch's last one may be short)."""
        return min(self.global_batch, self.limit - batch * self.global_batch) // self.world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, "shards"))
        order = rng.permutation(len(self.urls))
        stages = [wds.SimpleShardList([self.urls[i] for i in order]), wds.tarfile_to_samples()]
        if self.subset is not None:
            offsets = dict(zip(self.urls, np.cumsum([0, *self.shard_samples[:-1]]).tolist(), strict=True))
            stages.append(_subset(offsets, self.subset))
        stages += [wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=derive_seed(self.seed, self.epoch)),
                   self._share(worker, workers), wds.map(self.transform)]
        return iter(wds.DataPipeline(*stages))

    def _share(self, worker: int, workers: int):
        """This process's and worker's samples of the shuffled order: of each global batch (worker's turn),
        the rank-th run of `local_batch` samples."""
        def select(samples):
            for position, sample in enumerate(samples):
                if position >= self.limit:
                    return
                batch, offset = divmod(position, self.global_batch)
                if batch % workers == worker and offset // self.local_batch(batch) == self.rank:
                    yield sample
        return select

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


def _subset(offsets: dict[str, int], keep: frozenset[int]):
    """The samples whose index in the manifest's shard order (their shard's offset + their place in it) is kept."""
    def select(samples):
        seen: dict[str, int] = {}
        for sample in samples:
            url = sample["__url__"]
            place = seen[url] = seen.get(url, -1) + 1
            if offsets[url] + place in keep:
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
