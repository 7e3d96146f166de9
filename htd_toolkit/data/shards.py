"""Deterministic, atomic WebDataset shard writing.

A shard is a plain ustar tar; members carry no time, owner or mode that varies between runs, so
the same samples give the same bytes. Each shard is written under `NAME.partial` and renamed when
complete; a complete shard with the same bytes is left alone, so a resumed run rewrites nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from htd_toolkit.data.outputs import record_written
from htd_toolkit.errors import UserError
from htd_toolkit.files import write_atomic

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_MEMBER_BYTES = 256 << 20  # a patch, mask or JSON; a larger declared size is a hostile or broken tar
Sample = tuple[str, list[tuple[str, bytes]]]  # key, [(extension, bytes)] in member order
MEMBER_KINDS = {tarfile.DIRTYPE: "a directory", tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
                tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


# A sample's members (docs/formats.md): the image, the class-id mask, the metadata. Every reader and writer
# names them through these.
IMAGE, MASK, META = "png", "mask.png", "json"
IMAGE_EXTENSIONS = (IMAGE, "jpg", "webp")  # the image member, whichever format it was written in
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what PIL may decode from a shard: no other plugin ever runs
MAX_IMAGE_SIDE = 8192  # every image the toolkit decodes has at most this many pixels squared (a 4096-px patch
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE**2  # is a quarter of it); checked from the header, before decoding


def sample_member(members: dict[str, bytes], extensions: tuple[str, ...], where: str) -> tuple[str, bytes]:
    """(extension, bytes) of the first of `extensions` a sample has; one line naming `where` when it has none."""
    found = next((ext for ext in extensions if ext in members), None)
    if found is None:
        raise UserError(f"{where}: the sample has no {' or '.join(extensions)} member")
    return found, members[found]


def image_member(members: dict[str, bytes], where: str = "a sample") -> bytes:
    """The encoded image of a sample's members."""
    return sample_member(members, IMAGE_EXTENSIONS, where)[1]


def open_image(source: bytes | Path, where: str, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """The decoded image of encoded bytes or a file. One line naming `where` when it is none of `formats`, is cut
    short or corrupt, or has more than MAX_IMAGE_PIXELS pixels (refused from its header, before decoding)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise UserError(_too_large(where, f"{image.width} x {image.height} px"))
            image.load()
    except Image.DecompressionBombError as err:
        raise UserError(_too_large(where, f"more than {2 * Image.MAX_IMAGE_PIXELS:,} px")) from err
    except UnidentifiedImageError as err:
        raise UserError(f"{where}: not a {', '.join(formats)} image") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{where}: the image is cut short or corrupt ({err})") from err
    return image


def _too_large(where: str, size: str) -> str:
    return (f"{where}: an image of {size}; the toolkit reads images of at most {MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE} px "
            f"({MAX_IMAGE_PIXELS:,} px)")


def decode_image(data: bytes, mode: str | None = None, where: str = "an image member") -> np.ndarray:
    """Encoded image bytes as an array, converted to `mode` ("RGB") when given."""
    image = open_image(data, where)
    return np.asarray(image.convert(mode) if mode else image)


def one_channel(mask: np.ndarray, where: str) -> np.ndarray:
    """`mask` when it is one channel of class ids; one line naming its channels otherwise."""
    if mask.ndim == 3:
        raise UserError(f"{where}: a mask of {mask.shape[1]} x {mask.shape[0]} px with {mask.shape[2]} channels; "
                        "a mask is one channel of class ids")
    return mask


def decode_mask(data: bytes, where: str) -> np.ndarray:
    """An encoded class-id mask as a 2-D array."""
    return one_channel(decode_image(data, where=where), where)


def decode_sample(members: dict[str, bytes], shard: Path | str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A sample's RGB image and class-id mask; a missing or unreadable one is one line naming shard and member."""
    ext, image = sample_member(members, IMAGE_EXTENSIONS, f"{shard} ({key})")
    _, mask = sample_member(members, (MASK,), f"{shard} ({key})")
    return decode_image(image, "RGB", f"{shard} ({key}.{ext})"), decode_mask(mask, f"{shard} ({key}.{MASK})")


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if not KEY_PATTERN.match(key):
                raise ValueError(f"sample key {key!r} must match {KEY_PATTERN.pattern} (no dots)")
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_tar(path: Path) -> Iterator[Sample]:
    """Samples of a shard in order, members grouped by key (the part of the name before the first dot).
    A truncated or corrupt tar, or a member declaring an absurd size, is one line naming the file."""
    try:
        yield from _read_tar(path)
    except (tarfile.TarError, EOFError) as err:
        raise UserError(f"{path}: not a readable tar file (truncated or corrupt: {err})") from err


def _read_tar(path: Path) -> Iterator[Sample]:
    with tarfile.open(path, mode="r:") as tar:  # plain tar only: no transparent decompression
        key, members = None, []
        for info in tar:
            if not info.isfile():
                kind = MEMBER_KINDS.get(info.type, "not a regular file")
                raise UserError(f"{path}: member {info.name!r} is {kind}; a shard holds regular files only")
            if info.size > MAX_MEMBER_BYTES:
                raise UserError(f"{path}: member {info.name!r} declares {info.size} bytes; "
                                f"no sample file is larger than {MAX_MEMBER_BYTES >> 20} MiB")
            name = info.name.rsplit("/", 1)[-1]
            member_key, _, ext = name.partition(".")
            if member_key != key and key is not None:
                yield key, members
                members = []
            key = member_key
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name!r} is cut short")
            members.append((ext, data))
        if key is not None:
            yield key, members


@dataclass
class ShardSet:
    """Writes `prefix-NNNNN.tar` shards of `shard_size` samples into `folder`, recording each one."""

    folder: Path
    prefix: str
    shard_size: int
    root: Path  # paths in the records are relative to it
    records: list[dict] = field(default_factory=list)
    _pending: list[Sample] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self._pending.append(sample)
        if len(self._pending) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.folder / f"{self.prefix}-{len(self.records):05d}.tar"
        self.records.append(write_shard(path, self._pending, self.root))
        self._pending = []

    def close(self) -> list[dict]:
        self.flush()
        return self.records


def write_shard(path: Path, samples: list[Sample], root: Path) -> dict:
    """Write `samples` as one tar shard (atomically, journaled as written under `root`) and return its
    manifest record: path relative to `root`, sha256, sample count, first and last key, bytes."""
    data = tar_bytes(samples)
    record_written(root, path)
    write_atomic(path, data)
    return {"path": path.relative_to(root).as_posix(), "sha256": hashlib.sha256(data).hexdigest(),
            "samples": len(samples), "first_key": samples[0][0], "last_key": samples[-1][0], "size": len(data)}
