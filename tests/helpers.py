"""Small helpers shared by the tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from htd_toolkit.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `htd-toolkit ARGS` in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
