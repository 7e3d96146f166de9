"""A background shard writer, so the accelerator never waits for image encoding or disk.

The generating thread hands over batches; this thread encodes them, fills each shard in sample
order, writes it atomically when complete and records it. The record holds everything the manifest
and the card need from the shard (sha256, counts, its class statistics), and the bundle's first samples
are kept beside it (`NNNNN.grid.tar`) for the card's grid, so a bundle can be finished after its shards
have left the disk. Errors surface in the generating thread at its next `put` or at `close`.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.data.shards import MASK, META, encode_json, encode_png, tar_bytes, write_shard
from htd_toolkit.files import write_atomic

FORMATS = {"png": ("PNG", {"compress_level": 6}), "jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
           "webp": ("WEBP", {"quality": 95, "method": 4})}


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    if image_format == "png":
        return encode_png(image)
    name, options = FORMATS[image_format]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=name, **options)
    return buf.getvalue()


def shard_path(out: Path, index: int) -> Path:
    return out / "data" / f"train-{index:05d}.tar"


def record_path(out: Path, index: int) -> Path:
    return out / ".work" / "shards" / f"{index:05d}.json"


def grid_path(out: Path, index: int) -> Path:
    """The shard's samples among the bundle's first few (the card's grid), kept after the shard is deleted."""
    return out / ".work" / "shards" / f"{index:05d}.grid.tar"


GRID_SAMPLES = 8  # the bundle's first samples make the card's grid
DOMINANT_BINS = 10  # the heterogeneity histogram: share of the tissue its dominant class covers, in tenths


def shard_stats(fractions: list[list[float]]) -> dict:
    """A shard's part of the bundle's class statistics: per-class sums of pixel fractions, how many samples
    hold each class, and its counts in the dominant-class histogram (sums, so shards add up)."""
    fractions_array = np.asarray(fractions, float)
    tissue = fractions_array[:, 1:]
    dominant = tissue.max(axis=1) / np.maximum(tissue.sum(axis=1), 1e-9)
    counts, _ = np.histogram(dominant, bins=DOMINANT_BINS, range=(0.0, 1.0))
    return {"fraction_sums": [float(v) for v in fractions_array.sum(axis=0)],
            "present_in": [int(v) for v in (fractions_array > 0).sum(axis=0)], "dominant_counts": counts.tolist()}


class ShardWriter:
    """`on_written(shard, record)` runs on this thread once a shard and its record are on disk; `grid_keys`
    are the samples kept for the card's grid."""

    def __init__(self, out: Path, image_format: str, shard_sizes: dict[int, int], depth: int = 4,
                 on_written: Callable[[int, dict], None] | None = None, grid_keys: frozenset[str] = frozenset()):
        self.out, self.image_format, self.shard_sizes = out, image_format, shard_sizes
        self.on_written, self.grid_keys = on_written, grid_keys
        self.pending: dict[int, list] = {}
        self.fractions: dict[int, list] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def put(self, shard: int, samples: list[tuple[str, np.ndarray, np.ndarray, dict]]) -> None:
        """Queue (key, image, labels, metadata) samples of `shard`, in order."""
        self._raise()
        self.queue.put((shard, samples))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._add(*item)
            except BaseException as err:  # handed to the generating thread
                self.error = err

    def _add(self, shard: int, samples: list) -> None:
        encoded = [(key, [(self.image_format, encode_image(image, self.image_format)),
                          (MASK, encode_png(labels)), (META, encode_json(meta))])
                   for key, image, labels, meta in samples]
        self.pending.setdefault(shard, []).extend(encoded)
        self.fractions.setdefault(shard, []).extend(meta["class_fractions"] for _, _, _, meta in samples)
        if len(self.pending[shard]) < self.shard_sizes[shard]:
            return
        samples = self.pending.pop(shard)
        grid = [sample for sample in samples if sample[0] in self.grid_keys]
        if grid:
            write_atomic(grid_path(self.out, shard), tar_bytes(grid))
        record = {**write_shard(shard_path(self.out, shard), samples, self.out), "split": "train",
                  "stats": shard_stats(self.fractions.pop(shard))}
        write_atomic(record_path(self.out, shard), json.dumps(record).encode())
        if self.on_written is not None:
            self.on_written(shard, record)
