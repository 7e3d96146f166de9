"""Streaming a bundle to a Hub dataset repo while it is generated (`generate --push-to-hub`).

A background thread LFS-uploads each shard as soon as the shard writer has it on disk
(`HfApi.preupload_lfs_files`) and commits the uploaded shards in batches, every `commit_every` shards or
`commit_minutes`, whichever comes first. Each commit also writes manifest.json, id2label.json and the card of
everything the repo then holds, so the repo loads (`load_dataset`) at every commit; the commit that completes
the bundle adds the card's pictures. Those files are made from the shards' records (`generate/writer.py`),
never from the shard files, which `max_local_shards` lets the run delete once committed.

Many writers (the processes of an `accelerate launch`, array jobs given `--shard I/N`) push to one repo: a
commit is made on the head it read the manifest from (`parent_commit`); when another writer committed in
between the Hub answers 412 and the commit is made again on the new head, the manifests merged. A commit is
all or nothing, so the repo never holds half a shard or a shard its manifest does not list; a killed run
started again reads what is committed (the manifest's records, checked against the LFS sha256 of each file)
and makes, uploads and commits only the rest.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from htd_toolkit.classes import ID2LABEL, id2label
from htd_toolkit.data.folder import MANIFEST, manifest_problem
from htd_toolkit.errors import UserError
from htd_toolkit.generate.bundle import bundle_manifest
from htd_toolkit.generate.writer import grid_path, record_path, shard_path
from htd_toolkit.publish.hub import _status, hub_reason, open_repo, report_visibility, with_retries

logger = logging.getLogger(__name__)
CONFLICT_RETRIES = 20  # commits by other writers in between: each one costs a re-read and a new attempt
MANIFEST_PARTS = ("splits", "shards", "stats")  # what a manifest adds up from its shards; the rest is its header
UNCOMPARED = ("batch_size",)  # options that may differ between writers of one bundle


@dataclass
class StreamOptions:
    repo_id: str
    public: bool = False
    commit_every: int = 20  # shards per commit: 1,000 shards of 1,000 images make 50 commits
    commit_minutes: float = 10.0  # and at least one commit this often while shards are waiting
    max_local_shards: int | None = None  # delete committed shards, hold generation at this many; None keeps all
    model_repo: str | None = None  # the model repo the card names


def total_shards(manifest: dict) -> int:
    config = manifest["config"]
    return math.ceil(config["num_samples"] / config["shard_size"])


def is_complete(manifest: dict) -> bool:
    return len(manifest["shards"]) == total_shards(manifest)


def head_commit(api, repo_id: str) -> str:
    return with_retries(lambda: api.repo_info(repo_id, repo_type="dataset").sha, f"read {repo_id}")


def remote_manifest(api, repo_id: str, revision: str) -> dict | None:
    """The repo's manifest.json at `revision`, or None when it has none."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = with_retries(lambda: api.hf_hub_download(repo_id, MANIFEST, repo_type="dataset", revision=revision),
                            f"read {repo_id}/{MANIFEST}")
    except EntryNotFoundError:
        return None
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{repo_id}: its {MANIFEST} is not readable JSON ({type(err).__name__})") from err
    if problem := manifest_problem(manifest) or bundle_problem(manifest):
        raise UserError(f"{repo_id}: its {MANIFEST}: {problem}")
    return manifest


def bundle_problem(manifest: dict) -> str | None:
    """None when the manifest is a bundle's that `generate` made: a source naming the model, and a config
    counting its shards (`total_shards`)."""
    source, config = manifest.get("source"), manifest.get("config")
    if not (isinstance(source, dict) and isinstance(source.get("model"), str)):
        return "no source naming the model: not a bundle `generate` made"
    if isinstance(config, dict) and all(isinstance(config.get(key), int) and not isinstance(config[key], bool)
                                        and config[key] >= 1 for key in ("num_samples", "shard_size")):
        return None
    return "no config with num_samples and shard_size (whole numbers >= 1): not a bundle `generate` made"


def manifest_header(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key not in MANIFEST_PARTS}


def check_same_bundle(remote: dict, header: dict, repo_id: str) -> None:
    """One line when the repo holds another bundle (other options, model, maps or classes) than this run's."""
    ours = {**header["config"], **dict.fromkeys(UNCOMPARED)}
    theirs = {**remote.get("config", {}), **dict.fromkeys(UNCOMPARED)}
    differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if remote["classes"] != header["classes"]:
        differing.insert(0, "classes")
    if differing:
        raise UserError(f"{repo_id}: the repo holds another bundle (its {differing[0]} differs from this run's); "
                        "push to another repo")


def committed_records(api, repo_id: str, revision: str, manifest: dict | None) -> list[dict]:
    """The manifest's shard records whose file the repo holds with the sha256 the record names."""
    if not manifest or not manifest["shards"]:
        return []
    paths = [record["path"] for record in manifest["shards"]]
    infos = with_retries(lambda: api.get_paths_info(repo_id, paths, repo_type="dataset", revision=revision),
                         f"list {repo_id}")
    stored = {info.path: info.lfs.sha256 for info in infos if getattr(info, "lfs", None)}
    return [record for record in manifest["shards"] if stored.get(record["path"]) == record["sha256"]]


def merged_records(remote: list[dict], ours: list[dict]) -> list[dict]:
    by_path = {record["path"]: record for record in remote} | {record["path"]: record for record in ours}
    return [by_path[path] for path in sorted(by_path)]


def bundle_files(manifest: dict, repo_id: str, model_repo: str | None, grid_source) -> dict[str, bytes]:
    """manifest.json, id2label.json and README.md of `manifest`; with `grid_source` (record -> shard or grid
    tar) the card's pictures too."""
    from htd_toolkit.publish.cards import dataset_assets, dataset_card
    from htd_toolkit.publish.dataset import first_samples

    def as_json(obj) -> bytes:  # as data.folder.write_json writes it
        return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()

    files = {MANIFEST: as_json(manifest), ID2LABEL: as_json(id2label(manifest["classes"])),
             "README.md": str(dataset_card(manifest, repo_id=repo_id, model_repo=model_repo)).encode()}
    if grid_source is not None:
        files |= dataset_assets(manifest, first_samples(Path("."), manifest, source=grid_source))
    return files


def commit_bundle(api, repo_id: str, header: dict, additions: list, records: list[dict], grid_source,
                  model_repo: str | None = None) -> dict:
    """Commit the uploaded `additions` (shards named by `records`) with the manifest, id2label and card of the
    repo's shards and these, on the head the manifest was read from; again on the new head after another
    writer's commit. `grid_source(head)` gives the shards' reader for the card's pictures once complete.
    Returns the manifest committed."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    for _ in range(CONFLICT_RETRIES):
        head = head_commit(api, repo_id)
        remote = committed_records(api, repo_id, head, remote_manifest(api, repo_id, head))
        manifest = bundle_manifest(header, merged_records(remote, records))
        files = bundle_files(manifest, repo_id, model_repo, grid_source(head) if is_complete(manifest) else None)
        operations = additions + [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
                                  for name, data in files.items()]
        message = f"Add {len(records)} shard(s): {len(manifest['shards'])} of {total_shards(manifest)}"
        try:
            with_retries(partial(api.create_commit, repo_id, operations, repo_type="dataset", commit_message=message,
                                 parent_commit=head), f"commit to {repo_id}")
            return manifest
        except HfHubHTTPError as err:
            if _status(err) != 412:
                raise
            logger.info("%s: another writer committed first; committing again on the new head", repo_id)
    raise UserError(f"{repo_id}: {CONFLICT_RETRIES} commits in a row lost the race to other writers; run the same "
                    "command again")


class HubStream:
    """The uploader of one generating process. `open` before generating (returns the shards already committed),
    `add` from the shard writer's thread, `wait_for_room` before each shard, `close` at the end."""

    def __init__(self, options: StreamOptions, out: Path):
        from huggingface_hub import HfApi

        self.options, self.out, self.api = options, Path(out), HfApi()
        self.header: dict = {}
        self.paths: dict[str, int] = {}  # repo path -> shard index, of this process's shards
        self.local: set[int] = set()  # this process's shards on disk and not yet committed
        self.queue: queue.Queue = queue.Queue()
        self.room = threading.Condition()
        self.error: BaseException | None = None
        self.commits = 0
        self.thread = threading.Thread(target=self._run, name="hub-uploader", daemon=True)

    # --- the generating process's side ------------------------------------------------------------------------
    def open(self, header: dict, shards: list[int]) -> set[int]:
        """Create the repo (private unless --public; a public one only with --public) and start the uploader.
        Returns which of `shards` the repo holds already (their local files are deleted under a disk budget)."""
        from huggingface_hub.errors import HfHubHTTPError

        repo_id = self.options.repo_id
        self.header = header
        self.paths = {shard_path(self.out, s).relative_to(self.out).as_posix(): s for s in shards}
        try:
            self.visibility = open_repo(self.api, repo_id, "dataset", self.options.public)
            head = head_commit(self.api, repo_id)
            remote = remote_manifest(self.api, repo_id, head)
            if remote is not None:
                check_same_bundle(remote, header, repo_id)
            committed = {self.paths[r["path"]] for r in committed_records(self.api, repo_id, head, remote)
                         if r["path"] in self.paths}
        except HfHubHTTPError as err:
            raise UserError(f"push to {repo_id} failed: {hub_reason(err)}") from err
        for shard in committed:
            self._drop_local(shard)
        self.local = {s for s in shards if s not in committed and shard_path(self.out, s).exists()}
        self.thread.start()
        return committed

    def upload_finished(self, shards: list[int]) -> None:
        """Queue shards finished by an earlier run but not committed."""
        for shard in shards:
            self.queue.put((shard, json.loads(record_path(self.out, shard).read_text())))

    def add(self, shard: int, record: dict) -> None:
        with self.room:
            self.local.add(shard)
        self.queue.put((shard, record))

    def wait_for_room(self) -> None:
        """Hold generation while `max_local_shards` shards wait on disk for their commit."""
        with self.room:
            while self._disk_full() and self.error is None:
                self.room.wait(timeout=1.0)
        self._raise()

    def _disk_full(self) -> bool:
        """The disk budget is spent: generation waits, so the uploader commits without waiting for a batch."""
        with self.room:
            return bool(self.options.max_local_shards) and len(self.local) >= self.options.max_local_shards

    def close(self) -> None:
        """Commit what is left and stop the uploader; its error, if any, as one line."""
        self.queue.put(None)
        self.thread.join()
        self._raise()
        report_visibility(self.options.repo_id, "dataset", self.visibility, self.options.public)

    def _raise(self) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(self.error, (HfHubHTTPError, OSError)):  # OSError: ConnectionError and its kin
            raise UserError(f"push to {self.options.repo_id} failed: {hub_reason(self.error)}; finished shards are "
                            "kept and the same command continues") from self.error
        if self.error is not None:
            raise self.error

    # --- the uploader thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        pending: list[tuple[int, object, dict]] = []
        deadline = None
        try:
            while True:
                # a wait past threading.TIMEOUT_MAX is an OverflowError (--commit-minutes 1e9)
                timeout = None if deadline is None else min(max(0.0, deadline - time.monotonic()),
                                                             threading.TIMEOUT_MAX)
                try:
                    item = self.queue.get(timeout=timeout)
                except queue.Empty:
                    item = ()
                if item is None:
                    break
                if item:
                    pending.append(self._upload(*item))
                    deadline = deadline or time.monotonic() + self.options.commit_minutes * 60
                if pending and (len(pending) >= self.options.commit_every or time.monotonic() >= deadline
                                or self._disk_full()):
                    self._commit(pending)
                    pending, deadline = [], None
            if pending:
                self._commit(pending)
        except BaseException as err:  # handed to the generating thread
            with self.room:
                self.error = err
                self.room.notify_all()

    def _upload(self, shard: int, record: dict) -> tuple[int, object, dict]:
        from huggingface_hub import CommitOperationAdd

        operation = CommitOperationAdd(path_in_repo=record["path"], path_or_fileobj=shard_path(self.out, shard))
        with_retries(lambda: self.api.preupload_lfs_files(self.options.repo_id, [operation], repo_type="dataset"),
                     f"upload {record['path']}")
        return shard, operation, record

    def _commit(self, pending: list[tuple[int, object, dict]]) -> None:
        commit_bundle(self.api, self.options.repo_id, self.header, [op for _, op, _ in pending],
                      [record for _, _, record in pending], self._grid_source, self.options.model_repo)
        self.commits += 1
        for shard, _, _ in pending:
            self._drop_local(shard)

    def _drop_local(self, shard: int) -> None:
        """A committed shard leaves the disk under a budget (its record and grid samples stay)."""
        if self.options.max_local_shards:
            shard_path(self.out, shard).unlink(missing_ok=True)
        with self.room:
            self.local.discard(shard)
            self.room.notify_all()

    def _grid_source(self, head: str):
        return grid_reader(self.api, self.options.repo_id, head, self.out, self.paths)


def grid_reader(api, repo_id: str, head: str, out: Path | None = None, paths: dict[str, int] | None = None):
    """record -> a tar to read the card's first samples from: the shard's kept grid samples or the shard itself
    where this machine has them, else the shard downloaded from the repo at `head`."""

    def source(record: dict) -> Path:
        shard = (paths or {}).get(record["path"])
        if out is not None and shard is not None:
            for local in (grid_path(out, shard), shard_path(out, shard)):
                if local.exists():
                    return local
        return Path(with_retries(lambda: api.hf_hub_download(repo_id, record["path"], repo_type="dataset",
                                                             revision=head), f"read {record['path']}"))

    return source


def finalize_repo(repo_id: str, model_repo: str | None = None) -> dict:
    """`push --finalize`: commit the complete bundle's manifest, id2label, card and pictures from what the repo
    holds (the shards' records in its manifest); one line when shards are missing."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        head = head_commit(api, repo_id)
        remote = remote_manifest(api, repo_id, head)
        if remote is None:
            raise UserError(f"{repo_id}: no {MANIFEST}; nothing was streamed into this repo")
        records = committed_records(api, repo_id, head, remote)
        committed = len({record["path"] for record in records})  # a shard listed twice is one shard
        if committed < total_shards(remote):
            raise UserError(f"{repo_id}: {committed} of {total_shards(remote)} shards are committed; run the "
                            "jobs that make the others (the same command continues), then finalize")
        return commit_bundle(api, repo_id, manifest_header(remote), [], records,
                             lambda rev: grid_reader(api, repo_id, rev), model_repo)
    except HfHubHTTPError as err:
        raise UserError(f"finalize {repo_id} failed: {hub_reason(err)}") from err
