"""An `--out` folder belongs to the user. A command writes into it only when it is empty or holds nothing
but what htd-toolkit wrote there (named by the command's fixed outputs, the folder's own manifest and the
journal in `.work/`), unless `--overwrite` is given: then files under the names the command writes may
be replaced or removed. Refusals are one line naming the folder and a few of the files."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from htd_toolkit.errors import UserError

WORK = ".work"
JOURNAL = Path(WORK) / "written.txt"  # one relative path per line, appended before the file is written
# Temporary names of atomic writes, anywhere in the folder.
TEMPORARY = ("*.partial", "*/*.partial")


def record_written(root: Path, path: Path) -> None:
    """Journal `path` (inside `root`) as written by htd-toolkit, before writing it. One `O_APPEND` write per
    line, so processes sharing a folder (slide shards, accelerate ranks) do not interleave lines."""
    journal = Path(root) / JOURNAL
    journal.parent.mkdir(parents=True, exist_ok=True)
    line = (Path(path).relative_to(root).as_posix() + "\n").encode()
    descriptor = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def journaled(root: Path) -> set[str]:
    try:
        return set((Path(root) / JOURNAL).read_text().splitlines())
    except (OSError, UnicodeDecodeError):
        return set()


def manifest_listed(root: Path) -> set[str]:
    """The files an htd-toolkit manifest in `root` names (itself, id2label, its shards and crop bank); empty
    when there is no manifest or it is not one of ours."""
    try:
        manifest = json.loads((Path(root) / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not isinstance(manifest, dict) or "toolkit_version" not in manifest:
        return set()
    records = [r for key in ("shards", "crop_bank") if isinstance(manifest.get(key), list) for r in manifest[key]]
    return {"manifest.json", "id2label.json"} | {r["path"] for r in records if isinstance(r, dict)
                                                 and isinstance(r.get("path"), str)}


def foreign_files(out: Path, patterns: tuple[str, ...]) -> list[str]:
    """Files under `out` that neither `patterns`, the manifest nor the journal name."""
    ours = manifest_listed(out) | journaled(out)
    found = []
    for path in sorted(out.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = path.relative_to(out).as_posix()
        if relative in ours or relative.startswith(WORK + "/"):
            continue
        if not any(fnmatch.fnmatchcase(relative, p) for p in patterns + TEMPORARY):
            found.append(relative)
    return found


def claim_output(out: Path, command: str, patterns: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Check `out` before `command` writes anything into it: a folder (created if missing), writable, holding
    nothing foreign unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; --out names the folder {command} writes")
    if out.is_dir() and not overwrite:
        foreign = foreign_files(out, patterns)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"{out}: holds files {command} did not write ({shown}); choose an empty folder "
                            "or pass --overwrite to let it replace them")
    writable_folder(out / WORK)


def writable_folder(folder: Path, flag: str = "--out") -> None:
    """Create `folder` if needed and write a probe file there: one line, before any work, when it is a
    file or cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; {flag} names a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{folder}: cannot write there ({err.strerror or err})") from err
