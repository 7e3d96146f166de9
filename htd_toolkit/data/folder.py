"""Assemble the dataset folder (docs/formats.md) from per-slide work files.

```
manifest.json  id2label.json  data/{train,validation,test}-NNNNN.tar  crop_bank/cCCC-NNNNN.tar
```
Samples go to shards split by slide, slides in id order; crops of class C from train slides go to
`crop_bank/cCCC-*`. Shards left over from an earlier, larger run are removed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from htd_toolkit import __version__
from htd_toolkit.classes import (
    FINGERPRINT,
    ID2LABEL,
    ClassSpec,
    class_fingerprint,
    fingerprint_problem,
    write_id2label,
)
from htd_toolkit.data.outputs import record_written
from htd_toolkit.data.shards import IMAGE, ShardSet, read_tar
from htd_toolkit.errors import UserError
from htd_toolkit.files import sha256_file, write_json

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"


def read_manifest(folder: Path) -> dict:
    """The folder's manifest, checked for what every reader relies on: an object with a list of classes
    (index, name) and a list of shard records (path, sha256, samples). One line naming the file otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: not a dataset folder (no {MANIFEST}); write one with `htd-toolkit prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable JSON manifest ({type(err).__name__})") from err
    problem = manifest_problem(manifest)
    if problem:
        raise UserError(f"{path}: {problem}")
    return manifest


def manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    classes, shards = manifest.get("classes"), manifest.get("shards")
    if not isinstance(classes, list) or not classes:
        return "no list of classes"
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in classes) or \
            [c.get("index") for c in classes] != list(range(len(classes))):
        return "classes must be objects with a name and indexes 0, 1, 2, ... in order"
    if not isinstance(shards, list):
        return "no list of shards"
    if FINGERPRINT in manifest and (problem := fingerprint_problem(manifest[FINGERPRINT], classes)):
        return problem
    for record in shards + (manifest.get("crop_bank") or []):
        if not (isinstance(record, dict) and isinstance(record.get("path"), str)
                and isinstance(record.get("sha256"), str) and isinstance(record.get("samples"), int)):
            return "every shard record needs a path, a sha256 and a sample count"
    return None


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records of `split` (records without one are train)."""
    return [shard for shard in manifest["shards"] if shard.get("split", "train") == split]


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")  # gzip, bzip2, xz, zstd


def check_mask(mask, num_classes: int, where: str) -> None:
    """Mask values are class indexes below K, or 255 (ignore)."""
    values = set(np.unique(mask).tolist()) - {255}
    if values and max(values) >= num_classes:
        raise UserError(f"{where}: mask value {max(values)} is not a class index (K = {num_classes}, 255 = ignore)")


def shard_file(folder: Path, record: dict, verify: bool = False) -> Path:
    """The file of a manifest's shard record, checked: a plain relative path to a regular, uncompressed tar
    inside `folder`. Anything else (a URL or `pipe:` command, an absolute path, `..`, a symlink out of the
    folder, a compressed file) is refused with one line naming the manifest: shard paths come from files
    that may have been downloaded, and webdataset would run a `pipe:` path through a shell."""
    manifest = Path(folder) / MANIFEST
    path = record.get("path") if isinstance(record, dict) else None
    if not isinstance(path, str) or not path:
        raise UserError(f"{manifest}: a shard record without a path")
    relative = Path(path)
    if relative.is_absolute() or ".." in relative.parts or ":" in path or "\\" in path:
        raise UserError(f"{manifest}: shard path {path!r} is not a plain relative path inside the folder")
    root = Path(folder).resolve()
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise UserError(f"{manifest}: shard path {path!r} leads out of the folder")
    if not resolved.is_file():
        raise UserError(f"{manifest}: shard {path!r} is missing")
    with open(resolved, "rb") as handle:
        if handle.read(6).startswith(COMPRESSED_MAGIC):
            raise UserError(f"{manifest}: shard {path!r} is compressed; shards are plain tar files")
    if verify and sha256_file(resolved) != record.get("sha256"):
        raise UserError(f"{manifest}: shard {path!r} does not match its sha256 (truncated or changed); "
                        "write or download it again")
    return resolved


def shard_files(folder: Path, manifest: dict, split: str, verify: bool = False) -> list[tuple[dict, Path]]:
    """(record, checked file) of every shard of `split`; `verify` also checks each one's sha256."""
    return [(record, shard_file(folder, record, verify)) for record in split_shards(manifest, split)]


def write_manifest(folder: Path, manifest: dict) -> None:
    """`folder/manifest.json`, atomically: written under a temporary name, then renamed."""
    write_json(Path(folder) / MANIFEST, manifest)


def assemble(out: Path, slides: list[tuple[str, str, Path, Path]], classes: list[ClassSpec], shard_size: int,
             source: dict, config: dict, stats: dict) -> dict:
    """Write shards, crop bank, manifest and id2label from (slide id, split, samples tar, crops tar)."""
    shards: list[dict] = []
    for split in SPLITS:
        shard_set = ShardSet(out / "data", split, shard_size, out)
        for _, slide_split, samples_tar, _ in sorted(slides):
            if slide_split == split:
                for sample in read_tar(samples_tar):
                    shard_set.add(sample)
        shards += [{**record, "split": split} for record in shard_set.close()]
    crop_sets = {spec.index: ShardSet(out / "crop_bank", f"c{spec.index:03d}", shard_size, out)
                 for spec in classes[1:]}
    seen, duplicates = set(), 0
    for _, split, _, crops_tar in sorted(slides):
        if split == "train":
            for key, members in read_tar(crops_tar):
                cls = int(key.rsplit("_c", 1)[1])
                pixels = (cls, hashlib.sha256(dict(members)[IMAGE]).digest())
                duplicates += pixels in seen  # overlapping windows cut the same crop twice
                if pixels not in seen:
                    seen.add(pixels)
                    crop_sets[cls].add((key, members))
    crop_bank = [{**record, "class": index} for index, shard_set in crop_sets.items() for record in shard_set.close()]
    remove_stale(out, {record["path"] for record in shards + crop_bank})
    manifest = {
        "toolkit_version": __version__,
        "source": source,
        "classes": [spec.to_dict() for spec in classes],
        FINGERPRINT: class_fingerprint([spec.to_dict() for spec in classes], config.get("centroids"),
                                       config.get("encoder")),
        "config": config,
        "splits": {split: sum(r["samples"] for r in shards if r["split"] == split) for split in SPLITS},
        "shards": shards,
        "crop_bank": crop_bank,
        "stats": {**stats, "duplicate_crops": duplicates},
    }
    for name in (ID2LABEL, MANIFEST):
        record_written(out, out / name)
    write_id2label(out, classes)
    write_manifest(out, manifest)
    return manifest


def remove_stale(out: Path, keep: set[str]) -> None:
    for folder in ("data", "crop_bank"):
        for path in (out / folder).glob("*.tar*"):
            if path.relative_to(out).as_posix() not in keep:
                path.unlink()
