"""htd-toolkit: HeteroTissue-Diffuse (arXiv 2509.17847) from whole-slide images to the Hugging Face Hub."""

from pathlib import Path

__version__ = "0.1.0"

# Installed, `htd_toolkit.recipes` and `htd_toolkit.dataset_cards` are the repository's recipes/ and
# dataset_cards/ folders (pyproject.toml maps them). In a checkout run without installing
# (`PYTHONPATH=.`, as on the GPU machine) the same names find the same folders through this path entry.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "recipes" / "train_controlnet.py").is_file():
    __path__.append(str(_checkout))
