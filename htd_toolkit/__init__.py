"""htd-toolkit: HeteroTissue-Diffuse (arXiv 2509.17847) from whole-slide images to the Hugging Face Hub."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# Installed, `htd_toolkit.recipes` and `htd_toolkit.dataset_cards` are the repository's recipes/ and
# dataset_cards/ folders (pyproject.toml maps them). In a checkout run without installing (`PYTHONPATH=.`,
# as on the GPU machine) this finder gives those two names, and only those, the same folders: users run
# `accelerate launch recipes/train_controlnet.py` from the top of the repository, where diffusers keeps its
# examples, and the package loads the same files.
_CHECKOUT = Path(__file__).resolve().parent.parent
_CHECKOUT_FOLDERS = {f"{__name__}.{name}": _CHECKOUT / name for name in ("recipes", "dataset_cards")}


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = _CHECKOUT_FOLDERS.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if (_CHECKOUT / "pyproject.toml").is_file() and not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFolders())
