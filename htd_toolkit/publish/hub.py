"""Pushes to the Hugging Face Hub through `HfApi.upload_folder`: private by default, retried on
transient server errors, never uploading training checkpoints, work files or logs. The token comes
from the usual places (HF_TOKEN, `hf auth login`) and is never printed or written."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from htd_toolkit.errors import UserError

logger = logging.getLogger(__name__)
NEVER_UPLOAD = ["checkpoint-*", "checkpoint-*/**", ".work/**", "logs/**", "validation/**", "latents-cache/**", "*.partial",
                "**/*.partial"]
RETRIES = 4


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


def push_folder(folder: Path, repo_id: str, repo_type: str, private: bool, commit_message: str,
                token: str | None = None) -> str:
    """Create the repo if needed and upload `folder`; returns the commit URL. One-line errors."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise UserError(f"invalid repo id {repo_id!r}: {err}") from err
    api = HfApi(token=token)
    try:
        with_retries(lambda: api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True),
                     f"create {repo_id}")
        commit = with_retries(lambda: api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type,
                                                        commit_message=commit_message, ignore_patterns=NEVER_UPLOAD),
                              f"upload to {repo_id}")
    except HfHubHTTPError as err:
        raise UserError(f"push to {repo_id} failed: {hub_reason(err)}") from err
    return getattr(commit, "commit_url", str(commit))


def hub_reason(err: Exception) -> str:
    status = _status(err)
    if status == 401:
        return "not logged in or invalid token (set HF_TOKEN or run `hf auth login`)"
    if status == 403:
        return "the token has no write access to this namespace"
    return f"HTTP {status}" if status else type(err).__name__


def push_model(folder: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    return push_folder(Path(folder), repo_id, "model", private, "Upload HTD model", token)
