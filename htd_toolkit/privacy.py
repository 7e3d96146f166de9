"""Slide ids that do not leak file names (docs/formats.md, Privacy).

The id is HMAC-SHA256 of the slide's file name under a per-installation secret key (created on
first use in the user config folder, `HTD_SLIDE_KEY` overrides), first 16 hex digits. With
`keep_names` the file stem itself is used, made safe for WebDataset keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from htd_toolkit.config import config_dir

KEY_FILE = "slide_key"
UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


def slide_key() -> bytes:
    """The per-installation key; created (mode 600) on first use."""
    if env := os.environ.get("HTD_SLIDE_KEY"):
        return env.encode()
    path = config_dir() / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{KEY_FILE}.{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip().encode()


def slide_id(path: str | Path, keep_names: bool = False) -> str:
    """The id a slide goes by in everything written; never its name unless `keep_names`."""
    name = Path(path).name
    if keep_names:
        return UNSAFE.sub("-", Path(path).stem).strip("-") or "slide"
    return hmac.new(slide_key(), name.encode(), hashlib.sha256).hexdigest()[:16]
