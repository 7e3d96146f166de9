"""Small helpers shared by the tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from htd_toolkit.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `htd-toolkit ARGS` in-process; returns (exit code, stdout, stderr)."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_wds_shard(path, samples: list[tuple[str, np.ndarray, np.ndarray, dict]]) -> None:
    """A WebDataset tar of (key, RGB image, class mask, metadata) samples in the schema's member order."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, image, mask, meta in samples:
            sink.write({"__key__": key, "png": png_bytes(image), "mask.png": png_bytes(mask), "json": meta})


def slide_samples(slide_path, count: int, size: int = 32, offset: int = 0):
    """`count` real H&E patches of the slide with toy two-class masks (left half 1, right half 2)."""
    import tiffslide

    samples = []
    with tiffslide.TiffSlide(slide_path) as slide:
        for i in range(count):
            x, y = 600 + 40 * (i + offset), 900
            image = slide.read_region((x, y), 0, (size, size), as_array=True)
            mask = np.ones((size, size), np.uint8)
            mask[:, size // 2:] = 2
            meta = {"source": "real", "slide": "cc0", "x": x, "y": y, "class_fractions": [0.0, 0.5, 0.5]}
            samples.append((f"cc0_{i + offset:05d}", image, mask, meta))
    return samples


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels and holds none: what a decompression bomb shows first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
