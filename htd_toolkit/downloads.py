"""What may be downloaded from the Hub: a revision pinned to one commit whose file paths all stay inside
the folder they are downloaded into. Models, datasets and the recipe's `--dataset_name` download through it."""

from __future__ import annotations

from htd_toolkit.errors import UserError


def plain_repo_path(path: str) -> bool:
    """A repo file path that stays inside the folder it is downloaded into: no empty, '.' or '..' segment."""
    return all(part not in ("", ".", "..") and "\\" not in part for part in path.split("/"))


def checked_revision(repo_id: str, repo_type: str, revision: str | None = None, token: str | None = None) -> str:
    """The commit `revision` (default: the main branch) names, once every file path in it is a plain relative
    path: a repo holding `../../x` is one line, before anything is downloaded. Download that commit, not the
    branch, which may have moved since. Hub errors are the caller's to word."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    sha = api.repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    unsafe = [path for path in api.list_repo_files(repo_id, repo_type=repo_type, revision=sha)
              if not plain_repo_path(path)]
    if unsafe:
        raise UserError(f"{repo_id}: the repo holds a file named {unsafe[0]!r}, not a plain relative path; refused "
                        "before downloading anything")
    return sha
