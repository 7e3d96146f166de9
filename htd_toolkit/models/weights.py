"""A model folder's weight files, checked before and while the stock loaders read them.

Model folders come from anyone's Hub repo. Weights load from safetensors only (a pickled `.bin` is never
unpickled, whatever its name); every tensor must be floating point and finite, because NaN or infinite
weights generate black images without an error, and an integer tensor would be cast into the model
silently. Weights that do not fit the model (truncated, another shape) are one line naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from htd_toolkit.errors import UserError, one_line


def check_weight_file(path: Path) -> None:
    """One line naming `path` unless it is a readable safetensors file of finite floating-point tensors."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("*.bin"))
        beside = f" ({', '.join(pickles)} beside it is a pickle, which is never loaded)" if pickles else ""
        raise UserError(f"{path}: missing{beside}; weights load from safetensors files only")
    try:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                _check_tensor(path, name, handle.get_tensor(name))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file (truncated, or another format: a pickle is "
                        f"never loaded) ({one_line(err)})") from err


def _check_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise UserError(f"{path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; model weights are "
                        "floating point")
    if not torch.isfinite(tensor).all():
        raise UserError(f"{path}: tensor {name} holds NaN or infinite values")


@contextmanager
def loading(path: Path) -> Iterator[None]:
    """A stock loader's error while it reads `path` (weights of another shape, a broken config) as one line."""
    try:
        yield
    except (UserError, torch.OutOfMemoryError):
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: does not fit the model ({one_line(err)})") from err
