"""An `--out` folder belongs to the user. A command writes into it only when it is empty, or when it holds
the command's own earlier run with the same options (recorded in `.work/command.json`) and nothing but what
htd-toolkit wrote there (named by the command's outputs, the folder's own manifest and the journal in
`.work/`). Any other folder is refused in one line unless `--overwrite` is given: then what htd-toolkit
wrote there (the journal's files, the manifest's, the recorded command's outputs and `.work/`) is removed
and the user's other files are left alone. A folder that holds an input of the run is never an output, and
`--overwrite` never clears `/`, the home folder, the current directory or a folder holding one of them."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from htd_toolkit.errors import UserError

WORK = ".work"
JOURNAL = Path(WORK) / "written.txt"  # one relative path per line, appended before the file is written
RECORD = Path(WORK) / "command.json"  # the command that writes the folder and the options it runs with
# Temporary names of atomic writes, anywhere in the folder.
TEMPORARY = ("*.partial", "*/*.partial")


@dataclass
class Claim:
    """What a command is about to write into the folder `out`."""

    out: Path
    command: str  # as typed: "prepare annotated", "generate"
    options: dict  # what decides the folder's contents: it is continued only with the same values
    outputs: tuple[str, ...] = ()  # patterns of what it writes besides its manifest, journal and .work/
    user_files: tuple[str, ...] = ()  # patterns of files the user may keep there (a card): not foreign, kept
    inputs: tuple[Path | None, ...] = ()  # what the run reads: never inside its output
    overwrite: bool = False


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


def folder_files(out: Path) -> list[str]:
    """Relative paths of the files (and links) under `out`, without following links to folders."""
    found = []
    for folder, folders, files in os.walk(out):
        base = Path(folder)
        found += [(base / name).relative_to(out).as_posix() for name in files]
        found += [(base / name).relative_to(out).as_posix() for name in folders if (base / name).is_symlink()]
    return sorted(found)


def matches(relative: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, p) for p in patterns)


def foreign_files(out: Path, patterns: tuple[str, ...]) -> list[str]:
    """Files under `out` that neither `patterns`, the manifest nor the journal name."""
    ours = manifest_listed(out) | journaled(out)
    return [relative for relative in folder_files(out) if relative not in ours
            and not relative.startswith(WORK + "/") and not matches(relative, patterns + TEMPORARY)]


def refuse_foreign(out: Path, command: str, patterns: tuple[str, ...]) -> None:
    foreign = foreign_files(out, patterns)
    if foreign:
        raise UserError(f"{out}: holds files {command} did not write ({shown(foreign)}); choose an empty folder "
                        "or pass --overwrite to let it replace them")


def shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def claim_output(out: Path, command: str, patterns: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Check `out` before `command` writes anything into it: a folder (created if missing), writable, holding
    nothing foreign unless `overwrite`."""
    out = Path(out)
    refuse_root(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; --out names the folder {command} writes")
    if out.is_dir() and not overwrite:
        refuse_foreign(out, command, patterns)
    writable_folder(out / WORK)


def claim_launched(claim: Claim) -> None:
    """`claim_folder` under `accelerate launch`: the main process checks, clears and records first, the
    others check after it (before, they would find a folder in the middle of being claimed)."""
    from htd_toolkit.distributed import barrier, process_share

    main = process_share()[0] == 0
    if main:
        claim_folder(claim)
    barrier()
    if not main:
        claim_folder(claim, main=False)


def claim_folder(claim: Claim, main: bool = True) -> None:
    """Check `claim.out` before its command writes anything there (see the module's rules); on the main
    process, clear what an earlier, other run wrote (with --overwrite) and record this run."""
    out = Path(claim.out)
    refuse_root(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; --out names the folder {claim.command} writes")
    refuse_inputs(out, claim.inputs)
    record = read_record(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    continued = continues(record, claim)
    if entries and not continued and not claim.overwrite:
        raise UserError(unrelated_folder(out, record, claim, entries))
    if continued and not claim.overwrite:
        refuse_foreign(out, claim.command, claim.outputs + claim.user_files)
    if entries and not continued:
        refuse_clearing(out, claim.inputs)
    writable_folder(out / WORK)
    if main:
        if entries and not continued:
            clear_toolkit_files(out, record)
        merged = {**(record or {}).get("options", {}), **normalised(claim.options)} if continued else claim.options
        write_record(out, claim, merged)


@contextmanager
def given_back_if_stopped(out: Path):
    """Around a claim and the input checks after it: a run stopped by bad input (a `UserError`) takes its claim
    back from a folder it found empty or missing, so that the corrected run, whatever its options, finds the
    folder as it was."""
    from htd_toolkit.distributed import process_share

    out = Path(out)
    existed = out.is_dir()
    fresh = not existed or not any(out.iterdir())
    try:
        yield
    except UserError:
        if fresh and process_share()[0] == 0:
            shutil.rmtree(out / WORK, ignore_errors=True)
            if not existed:
                with suppress(OSError):
                    out.rmdir()
        raise


def normalised(options: dict) -> dict:
    """`options` as JSON gives them back (tuples as lists, paths as text), so that a record compares equal."""
    return json.loads(json.dumps(options, default=str, sort_keys=True))


def read_record(out: Path) -> dict | None:
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("command"), str) and isinstance(record.get("options"), dict)
    return record if ok else None


def write_record(out: Path, claim: Claim, options: dict) -> None:
    from htd_toolkit.files import write_atomic

    record = {"command": claim.command, "options": options, "outputs": list(claim.outputs)}
    write_atomic(out / RECORD, (json.dumps(normalised(record), indent=2, sort_keys=True) + "\n").encode())


def continues(record: dict | None, claim: Claim) -> bool:
    """The folder holds a run of the same command whose options agree on every option both name (the
    stages of `prepare unannotated` each name theirs)."""
    if record is None or record["command"] != claim.command:
        return False
    return not differing_options(record["options"], claim.options)


def differing_options(recorded: dict, options: dict) -> list[str]:
    current = normalised(options)
    return sorted(key for key in current.keys() & recorded.keys() if current[key] != recorded[key])


def unrelated_folder(out: Path, record: dict | None, claim: Claim, entries: list[str]) -> str:
    advice = "choose an empty folder or pass --overwrite to replace what htd-toolkit wrote there"
    if record is None:
        return f"{out}: holds files {claim.command} did not write ({shown(entries)}); {advice}"
    if record["command"] != claim.command:
        return f"{out}: holds the output of `{record['command']}`, which `{claim.command}` does not continue; {advice}"
    recorded, current = record["options"], normalised(claim.options)
    changes = "; ".join(f"{key} = {recorded[key]!r} there, not {current[key]!r}"
                        for key in differing_options(recorded, current))
    return (f"{out}: holds a `{claim.command}` run with other options ({changes}); run it with the same options "
            f"to continue, or {advice}")


def resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def refuse_root(out: Path) -> None:
    if resolved(out) == Path("/"):
        raise UserError(f"--out {out}: the root folder is never an output; choose a folder of your own")


def refuse_inputs(out: Path, inputs: Iterable[Path | None]) -> None:
    """A folder the run reads from, or one holding what it reads, is never its output."""
    target = resolved(out)
    for path in inputs:
        if path is not None and os.path.lexists(path) and resolved(path).is_relative_to(target):
            raise UserError(f"--out {out}: the run reads {path} there; an input is never an output, "
                            "--overwrite or not: choose another folder")


def refuse_clearing(out: Path, inputs: Iterable[Path | None]) -> None:
    """--overwrite never clears a folder holding the current directory, the home folder or an input."""
    target = resolved(out)
    for name, path in (("the current directory", Path.cwd()), ("your home folder", Path.home())):
        if resolved(path).is_relative_to(target):
            raise UserError(f"--out {out}: holds {name}; --overwrite never clears it, choose a folder of its own")
    refuse_inputs(out, inputs)


def inside(out: Path, relative: str) -> Path | None:
    """`out / relative` when it is a plain relative path that stays inside `out`, else None."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts:
        return None
    path = out / relative
    return path if resolved(path.parent).is_relative_to(resolved(out)) else None


def clear_toolkit_files(out: Path, record: dict | None) -> None:
    """Remove what htd-toolkit wrote into `out` (its journal's and manifest's files, the recorded command's
    outputs, `.work/`): the user's other files stay. Links are removed, never followed."""
    patterns = [p for p in (record or {}).get("outputs", []) if isinstance(p, str)]
    named = manifest_listed(out) | journaled(out)
    named |= {relative for relative in folder_files(out) if matches(relative, patterns + list(TEMPORARY))}
    for relative in sorted(named):
        path = inside(out, relative)
        if path is not None and (path.is_symlink() or path.is_file()):
            path.unlink()
    work = out / WORK
    if record is None and not (out / JOURNAL).is_file():
        return  # no run of ours: a `.work` there is the user's
    if work.is_symlink():
        work.unlink()
    elif work.is_dir():
        shutil.rmtree(work)


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
