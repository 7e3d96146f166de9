"""Per-installation locations: the cache (``HTD_CACHE`` overrides) and the config folder."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "htd-toolkit"


def cache_dir() -> Path:
    """Where downloaded sample data and other reproducible files are kept."""
    return Path(os.environ.get("HTD_CACHE") or platformdirs.user_cache_dir(APP_NAME))


def config_dir() -> Path:
    """Where per-installation settings (such as the slide-id key) live; ``HTD_CONFIG`` overrides."""
    return Path(os.environ.get("HTD_CONFIG") or platformdirs.user_config_dir(APP_NAME))


def compute_device():
    """This process's accelerator: `cuda:LOCAL_RANK` under `accelerate launch`, else cuda, else cpu."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def keep_compiled_kernels() -> Path:
    """Point torch.compile's on-disk cache at the htd-toolkit cache, unless TORCHINDUCTOR_CACHE_DIR is set.

    Inductor's default is /tmp/torchinductor_USER, which cluster jobs and containers often start
    without: every run would compile from scratch. Kept here, a second run with the same model and
    batch shapes reuses the kernels (generation at toy shapes: first batch 104 s cold, 8 s warm).
    """
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor")))
    path.mkdir(parents=True, exist_ok=True)
    return path
