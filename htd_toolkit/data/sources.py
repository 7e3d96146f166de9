"""Where conditions come from: the maps of a prepared split, and its crop bank.

Both are read once into memory as encoded bytes (a few hundred KB per thousand 512-px masks) and
decoded on demand; their order is the manifest's, so `map i mod M` is stable across runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from htd_toolkit.classes import FINGERPRINT
from htd_toolkit.data.folder import MANIFEST, check_mask, read_manifest, shard_files
from htd_toolkit.data.shards import IMAGE, MASK, META, decode_image, decode_mask, read_tar, sample_member
from htd_toolkit.errors import UserError
from htd_toolkit.files import sha256_file


@dataclass(frozen=True)
class Encoded:
    """A member kept as its PNG bytes and the sample's metadata, decoded on demand."""

    key: str
    png: bytes
    meta: dict
    where: str  # the shard and member, for messages


class MapEntry(Encoded):
    def labels(self) -> np.ndarray:
        return decode_mask(self.png, self.where)


def load_maps(folder: Path, split: str = "train") -> tuple[list[MapEntry], dict]:
    """Every map of `split` in manifest order, and the manifest."""
    manifest = read_manifest(folder)
    entries = []
    for _, path in shard_files(Path(folder), manifest, split, verify=True):
        for key, members in read_tar(path):
            entry = map_entry(dict(members), path, key)
            check_mask(entry.labels(), len(manifest["classes"]), f"{path} ({key})")
            entries.append(entry)
    if not entries:
        raise UserError(f"{folder}: no maps in the {split} split")
    return entries, manifest


def map_entry(members: dict[str, bytes], shard: Path, key: str) -> MapEntry:
    """A sample's mask and metadata; a missing member or metadata that is not JSON is one line."""
    where = f"{shard} ({key})"
    try:
        meta = json.loads(sample_member(members, (META,), where)[1])
    except ValueError as err:
        raise UserError(f"{where}: its json member is not JSON ({err})") from err
    return MapEntry(key, sample_member(members, (MASK,), where)[1], meta, f"{shard} ({key}.{MASK})")


class BankCrop(Encoded):
    def image(self) -> np.ndarray:
        return decode_image(self.png, "RGB", self.where)


class CropBank:
    """The crops of a prepared folder's `crop_bank/`, by class."""

    def __init__(self, folder: Path):
        self.folder = bank_folder(folder)
        if not self.folder.is_dir():
            raise UserError(f"{self.folder}: crop bank folder not found")
        # the class fingerprint of the prepared folder the bank belongs to, if it lies in one
        owner = self.folder.parent
        self.fingerprint = read_manifest(owner).get(FINGERPRINT) if (owner / MANIFEST).is_file() else None
        self.by_class: dict[int, list[BankCrop]] = {}
        for shard in sorted(self.folder.glob("c*.tar")):
            for key, members in read_tar(shard):
                members = dict(members)
                try:
                    meta = json.loads(members[META])
                    crop = BankCrop(key, members[IMAGE], meta, f"{shard} ({key}.{IMAGE})")
                    self.by_class.setdefault(int(meta["class"]), []).append(crop)
                except (KeyError, TypeError, ValueError) as err:
                    raise UserError(f"{shard} ({key}): not a crop-bank sample (a png and a json naming its "
                                    "class)") from err

    def draw(self, cls: int, rng: np.random.Generator, class_name: str | None = None) -> BankCrop:
        crops = self.by_class.get(cls)
        if not self.by_class:
            raise UserError(f"{self.folder}: no crop-bank shards (c*.tar) here; pass a prepared folder's crop_bank/")
        if not crops:
            name = f" ({class_name})" if class_name else ""
            raise UserError(f"{self.folder}: the crop bank has no crop of class {cls}{name}, which the maps need")
        return crops[int(rng.integers(len(crops)))]

    def draw_crops(self, classes: list[int], rng: np.random.Generator, names: dict[int, str]):
        """One crop per class, in order: (RGB crops by class, records {class, key, box} for the metadata)."""
        crops, records = {}, []
        for cls in classes:
            crop = self.draw(cls, rng, names.get(cls))
            crops[cls] = crop.image()
            records.append({"class": cls, "key": crop.key, "box": list(crop.meta.get("box", [0, 0, 0]))})
        return crops, records


def bank_folder(folder: Path) -> Path:
    """The crop bank's folder: `folder`, or its `crop_bank/` when `folder` is the prepared folder itself."""
    folder = Path(folder)
    return folder / "crop_bank" if (folder / MANIFEST).is_file() and (folder / "crop_bank").is_dir() else folder


def crop_bank_sha256(folder: Path | None) -> str | None:
    """A digest of the bank's shards (names and contents), what names it in a run's options; None without one."""
    if folder is None or not bank_folder(folder).is_dir():
        return None
    digest = hashlib.sha256()
    for shard in sorted(bank_folder(folder).glob("c*.tar")):
        digest.update(f"{shard.name}\0{sha256_file(shard)}\n".encode())
    return digest.hexdigest()


def crop_bank_for(crop_mode: str, folder: Path | None) -> CropBank | None:
    """The crop bank a model of `crop_mode` needs (None for a map-only model); one line when none is given."""
    if crop_mode == "none":
        return None
    if folder is None:
        raise UserError("--crop-bank is required: the model conditions on crops")
    return CropBank(folder)
