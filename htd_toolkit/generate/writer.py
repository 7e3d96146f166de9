"""A background shard writer, so the accelerator never waits for image encoding or disk.

The generating thread hands over batches; this thread encodes them, fills each shard in sample
order, writes it atomically when complete and records it. Errors surface in the generating thread
at its next `put` or at `close`.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.data.shards import MASK, META, encode_json, encode_png, write_shard
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


class ShardWriter:
    def __init__(self, out: Path, image_format: str, shard_sizes: dict[int, int], depth: int = 4):
        self.out, self.image_format, self.shard_sizes = out, image_format, shard_sizes
        self.pending: dict[int, list] = {}
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
        if len(self.pending[shard]) < self.shard_sizes[shard]:
            return
        record = {**write_shard(shard_path(self.out, shard), self.pending.pop(shard), self.out), "split": "train"}
        write_atomic(record_path(self.out, shard), json.dumps(record).encode())
