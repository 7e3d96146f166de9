"""The models that ship in the package, trained on the CC0 sample slide: an H&E base (`htd-toolkit
pretrain-base`, docs/fidelity.md) and the HTD model (crop mode `adapter`) fine-tuned on it. Loaders find
them here; the demo and the tests generate with them when no Hub is reachable."""

from __future__ import annotations

from pathlib import Path

from htd_toolkit.errors import UserError

SHIPPED_BASE = Path(__file__).with_name("he_base_cc0")
SHIPPED_BASE_ID = f"local:{SHIPPED_BASE.name}"  # how model folders trained on it name their base
# The `adapter` model of benchmarks/fidelity.py fine-tuned on that base: the routing tests' subject.
SHIPPED_ADAPTER = Path(__file__).with_name("he_adapter_cc0")


def shipped_adapter_model() -> Path:
    """The HTD model (crop_mode adapter, K = 4 stain-statistics tissue types) fine-tuned on the shipped base."""
    if not (SHIPPED_ADAPTER / "htd_config.json").exists():
        raise UserError(f"{SHIPPED_ADAPTER}: the shipped HTD model is missing from this installation")
    return SHIPPED_ADAPTER


def shipped_base() -> Path:
    """The H&E base trained on the CC0 sample slide that ships with the package."""
    if not (SHIPPED_BASE / "model_index.json").exists():
        raise UserError(f"{SHIPPED_BASE}: the shipped H&E base is missing from this installation")
    return SHIPPED_BASE
