"""Assemble the dataset folder of DESIGN.md §2 from per-slide work files.

```
manifest.json  id2label.json  data/{train,validation,test}-NNNNN.tar  crop_bank/cCCC-NNNNN.tar
```
Samples go to shards split by slide, slides in id order; crops of class C from train slides go to
`crop_bank/cCCC-*`. Shards left over from an earlier, larger run are removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from htd_toolkit import __version__
from htd_toolkit.annotations.base import ClassSpec
from htd_toolkit.data.outputs import record_written
from htd_toolkit.data.shards import ShardSet, read_tar, write_atomic
from htd_toolkit.errors import UserError

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
ID2LABEL = "id2label.json"


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records of `split` (records without one are train)."""
    return [shard for shard in manifest["shards"] if shard.get("split", "train") == split]


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")  # gzip, bzip2, xz, zstd


def shard_file(folder: Path, record: dict) -> Path:
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
    return resolved


def shard_files(folder: Path, manifest: dict, split: str) -> list[tuple[dict, Path]]:
    """(record, checked file) of every shard of `split`."""
    return [(record, shard_file(folder, record)) for record in split_shards(manifest, split)]


def id2label(classes: list[ClassSpec]) -> dict[str, str]:
    return {str(spec.index): spec.name for spec in classes}


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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
    for _, split, _, crops_tar in sorted(slides):
        if split == "train":
            for key, members in read_tar(crops_tar):
                crop_sets[int(key.rsplit("_c", 1)[1])].add((key, members))
    crop_bank = [{**record, "class": index} for index, shard_set in crop_sets.items() for record in shard_set.close()]
    remove_stale(out, {record["path"] for record in shards + crop_bank})
    manifest = {
        "toolkit_version": __version__,
        "source": source,
        "classes": [spec.to_dict() for spec in classes],
        "config": config,
        "splits": {split: sum(r["samples"] for r in shards if r["split"] == split) for split in SPLITS},
        "shards": shards,
        "crop_bank": crop_bank,
        "stats": stats,
    }
    for name in (ID2LABEL, MANIFEST):
        record_written(out, out / name)
    write_json(out / ID2LABEL, id2label(classes))
    write_json(out / MANIFEST, manifest)
    return manifest


def remove_stale(out: Path, keep: set[str]) -> None:
    for folder in ("data", "crop_bank"):
        for path in (out / folder).glob("*.tar*"):
            if path.relative_to(out).as_posix() not in keep:
                path.unlink()
