"""What a push publishes: the files a folder's contract names (docs/formats.md), never whatever else
happens to lie in the folder. A `.env`, notes, a slide, a stray shard the manifest does not list, a
symlink: all are left out and named in one warning line."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path

from htd_toolkit.data.folder import MANIFEST, read_manifest, shard_file
from htd_toolkit.errors import UserError
from htd_toolkit.models.folder import CARD_FILES, CONFIG_NAME, MODEL_FILES

logger = logging.getLogger(__name__)

# Work files a push never uploads and never warns about: they are expected to be there.
WORK_FILES = ("checkpoint-*", ".work", "logs", "validation", "latents-cache", "*.partial", ".cache",
              ".gitattributes",
              # a checkpoint's training state, beside its model folder
              "trainable.safetensors", "optimizer*.bin", "scheduler*.bin", "random_states_*.pkl")
MODEL_PATTERNS = (*CARD_FILES, *MODEL_FILES)  # the model folder's contract (docs/formats.md)
DATASET_PATTERNS = ("README.md", MANIFEST, "id2label.json", "assets/*.png")


@dataclass
class Contents:
    """The relative paths a push uploads, and what it leaves out."""
    kind: str  # "bundle", "prepared" or "model"
    files: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def warn(self, folder: Path) -> None:
        if self.left_out:
            shown = ", ".join(self.left_out[:5]) + (f" and {len(self.left_out) - 5} more" if len(self.left_out) > 5 else "")
            logger.warning("%s: left out of the push, not part of a %s: %s", folder, self.kind, shown)


def is_work_file(relative: str) -> bool:
    return any(fnmatch.fnmatchcase(part, pattern) for part in relative.split("/") for pattern in WORK_FILES)


def folder_files(folder: Path) -> list[str]:
    """Every file and symlink under `folder` (symlinked folders are not followed), as relative paths."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or path.is_file():
            relative = path.relative_to(folder).as_posix()
            if not is_work_file(relative):
                found.append(relative)
    return found


def inside_without_links(folder: Path, relative: str) -> bool:
    """A regular file reached from `folder` through no symlink."""
    path = folder
    for part in relative.split("/"):
        path = path / part
        if path.is_symlink():
            return False
    return path.is_file()


def folder_kind(folder: Path) -> str:
    """`model` (htd_config.json), `bundle` (a manifest whose source names a model) or `prepared`."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    if (folder / CONFIG_NAME).is_file():
        return "model"
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{folder}: neither a bundle, a prepared dataset nor a model folder "
                        f"(no {MANIFEST} or {CONFIG_NAME})")
    source = read_manifest(folder).get("source")
    return "bundle" if isinstance(source, dict) and "model" in source else "prepared"


def publishable(folder: Path, kind: str, manifest: dict | None = None) -> Contents:
    """The allow-list for `folder`: fixed names by kind, plus the shards (and crop bank) the manifest lists."""
    folder = Path(folder)
    patterns = MODEL_PATTERNS if kind == "model" else DATASET_PATTERNS
    listed = set()
    if kind != "model":
        manifest = manifest if manifest is not None else read_manifest(folder)
        shards = manifest["shards"] + (manifest.get("crop_bank") or [] if kind == "prepared" else [])
        for shard in shards:
            shard_file(folder, shard)  # a plain relative path inside the folder, or one line naming the manifest
        listed = {Path(shard["path"]).as_posix() for shard in shards}
    contents = Contents(kind)
    for relative in folder_files(folder):
        named = relative in listed or any(fnmatch.fnmatchcase(relative, p) for p in patterns)
        if named and inside_without_links(folder, relative):
            contents.files.append(relative)
        else:
            contents.left_out.append(relative + (" (symlink)" if named else ""))
    return contents
