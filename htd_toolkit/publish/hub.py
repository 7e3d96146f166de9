"""Pushes to the Hugging Face Hub with `HfApi.create_commit`: only the folder's allow-list
(`publish.contents`), private by default, retried on transient server errors; files the Hub already
has unchanged are not sent again, and shards or weights the folder no longer lists are deleted from the
repo (within the folders the contract owns), so a re-push mirrors the folder. A push never changes an
existing repo's visibility: a public repo takes a push only with `--public`, a private one stays private,
and the visibility the repo ends with is printed. The token comes from the usual places (HF_TOKEN,
`hf auth login`) and is never printed or written. Before a download, `downloads.checked_revision` refuses a repo listing a
file whose path would leave the folder it is downloaded into."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from htd_toolkit.errors import UserError

logger = logging.getLogger(__name__)
RETRIES = 4
PUBLISHED = Path(".work") / "published.json"  # where a folder was last pushed: a work file, never uploaded
# Repo folders a push owns: remote files there that the folder no longer lists are deleted.
OWNED_FOLDERS = {"dataset": ("data/", "crop_bank/", "assets/"),
                 "model": ("controlnet/", "crop_adapter/", "base/", "assets/")}


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def with_retries(call, what: str, retries: int = RETRIES, wait: float = 1.0):
    """Run `call()`, retrying 5xx answers and dropped connections with exponential backoff."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(retries + 1):
        try:
            return call()
        except (HfHubHTTPError, ConnectionError, OSError) as err:
            status = _status(err)
            transient = status is None or status >= 500 or status == 429
            if (isinstance(err, HfHubHTTPError) and not transient) or attempt == retries:
                raise
            logger.warning("%s: transient error (%s), retrying in %.0f s", what, status or type(err).__name__, wait)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def repo_visibility(api, repo_id: str, repo_type: str) -> str | None:
    """ "private" or "public" as the Hub reports the repo (one that does not say is taken as public); None when
    it does not exist or this token cannot see it."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = with_retries(lambda: api.repo_info(repo_id, repo_type=repo_type), f"read {repo_id}")
    except RepositoryNotFoundError:
        return None
    return "private" if info.private is True else "public"


def refuse_public_repo(repo_id: str, repo_type: str, visibility: str | None, public: bool,
                       training_data: bool = False) -> None:
    if visibility == "public" and not public:
        why = " (the folder holds real patient-derived patches)" if training_data else ""
        raise UserError(f"{repo_id} is a public {repo_type} repo: pass --public to push into it, or make it "
                        f"private on the Hub first{why}")


def check_visibility(repo_id: str, repo_type: str, public: bool, token: str | None = None) -> None:
    """Before anything is trained or pushed: one line when the repo exists and is public but `public` is not
    given."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        refuse_public_repo(repo_id, repo_type, repo_visibility(HfApi(token=token), repo_id, repo_type), public)
    except HfHubHTTPError as err:
        raise UserError(f"push to {repo_id} failed: {hub_reason(err)}") from err


def open_repo(api, repo_id: str, repo_type: str, public: bool, training_data: bool = False) -> str:
    """The repo a push goes to, created private unless `public`; one line when it is public and `public` is not
    given. Returns its visibility."""
    with_retries(lambda: api.create_repo(repo_id, repo_type=repo_type, private=not public, exist_ok=True),
                 f"create {repo_id}")
    visibility = repo_visibility(api, repo_id, repo_type) or "public"
    refuse_public_repo(repo_id, repo_type, visibility, public, training_data)
    return visibility


def report_visibility(repo_id: str, repo_type: str, visibility: str, public: bool) -> None:
    from htd_toolkit.terminal import console

    kept = " (it was private: --public does not change an existing repo's visibility; change it in the repo's " \
           "settings on the Hub)" if public and visibility == "private" else ""
    console.print(f"{repo_id}: a {visibility} {repo_type} repo{kept}", markup=False, highlight=False, soft_wrap=True)


def push_folder(folder: Path, repo_id: str, repo_type: str, private: bool, commit_message: str,
                token: str | None = None, generated: dict[str, bytes | Path] | None = None) -> str:
    """Create the repo if needed and commit the folder's allow-list (plus `generated` files, given as bytes or
    paths);
    returns the commit URL. One-line errors. Anything else in the folder is named in one warning line and
    left out."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    from htd_toolkit.publish.contents import folder_kind, publishable

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise UserError(f"invalid repo id {repo_id!r}: {err}") from err
    folder = Path(folder)
    kind = folder_kind(folder)
    if (kind == "model") != (repo_type == "model"):
        raise UserError(f"{folder}: a {kind} folder cannot be pushed to a {repo_type} repo")
    contents = publishable(folder, kind)
    contents.warn(folder)
    generated = generated or {}
    api = HfApi(token=token)
    try:
        visibility = open_repo(api, repo_id, repo_type, not private, training_data=kind == "prepared")
        remote = with_retries(lambda: api.list_repo_files(repo_id, repo_type=repo_type), f"list {repo_id}")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in contents.files]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in generated.items()]
        operations += stale_deletions(remote, contents.files + list(generated), OWNED_FOLDERS[repo_type])
        commit = with_retries(lambda: api.create_commit(repo_id, operations, repo_type=repo_type,
                                                        commit_message=commit_message), f"upload to {repo_id}")
    except HfHubHTTPError as err:
        raise UserError(f"push to {repo_id} failed: {hub_reason(err)}") from err
    record_published(folder, **{repo_type: repo_id})
    report_visibility(repo_id, repo_type, visibility, not private)
    return getattr(commit, "commit_url", str(commit))


def published_repos(folder: Path) -> dict:
    """{"dataset": repo id, "model": repo id} of the last successful push of `folder`, where there was one."""
    try:
        return json.loads((Path(folder) / PUBLISHED).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def record_published(folder: Path, **repos: str) -> None:
    path = Path(folder) / PUBLISHED
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(published_repos(folder) | repos, indent=2) + "\n")


def stale_deletions(remote: list[str], local: list[str], owned: tuple[str, ...]) -> list:
    """Deletions of remote files inside the folders a push owns that this push does not upload."""
    from huggingface_hub import CommitOperationDelete

    keep = set(local)
    return [CommitOperationDelete(path_in_repo=name) for name in remote
            if name.startswith(owned) and name not in keep]


def hub_reason(err: Exception) -> str:
    status = _status(err)
    if status == 401:
        return "not logged in or invalid token (set HF_TOKEN or run `hf auth login`)"
    if status == 403:
        return "the token has no write access to this namespace"
    return f"HTTP {status}" if status else type(err).__name__


def push_model(folder: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Push a model folder; its card's usage lines name `repo_id` first. Beside a folder the recipe wrote goes the
    saved pipeline's layout (`pipeline_layout`: model_index.json and a folder per component, the base included,
    written to a temporary folder), so that the repo loads with `DiffusionPipeline.from_pretrained` as its card
    shows."""
    import tempfile

    from htd_toolkit.models.pipeline import pipeline_layout
    from htd_toolkit.publish.cards import name_repo_in_model_card

    name_repo_in_model_card(Path(folder), repo_id)
    with tempfile.TemporaryDirectory(prefix="htd-pipeline-") as layout:
        generated = pipeline_layout(Path(folder), Path(layout))
        return push_folder(Path(folder), repo_id, "model", private, "Upload HTD model", token, generated)
