"""Classes: what class id i means, in every folder the tool reads or writes.

Index 0 is background (glass), 255 is ignore; each class has a name and a colour. This module owns the
class spec, the palette, `id2label.json`, the comparisons between two class lists and the class
fingerprint: everything else takes them from here.

The class fingerprint: class i of a map is only meaningful beside the definition that gave it: for
annotated data the ordered class names and colours, for pseudo-maps also the k-means centroids (and the
encoder) that numbered the tissue types. Names alone ("tissue type 001") match across runs whose clusters are numbered differently,
so every prepared folder (its crop bank included), every model (`htd_config.json`) and every generated
bundle records

    {"classes": [[name, colour], ...], "centroids": DIGEST, "encoder": SPEC, "digest": DIGEST}

and the commands that combine two of them (`generate`, `generate-slide`, `evaluate`, the recipe's
resume) refuse a mismatch in one line naming both sides. The centroid digest is of their values rounded
to 4 decimals, so that re-saving the same centroids gives the same digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from htd_toolkit.errors import UserError
from htd_toolkit.files import write_json

logger = logging.getLogger(__name__)

IGNORE = 255
ID2LABEL = "id2label.json"
FINGERPRINT = "class_fingerprint"
# Colours for classes a format does not colour itself (tab20-like, background first).
PALETTE = ["#000000", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ff9896", "#98df8a", "#ffbb78", "#c5b0d5"]


@dataclass(frozen=True)
class ClassSpec:
    index: int
    name: str
    color: str  # "#rrggbb"

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "color": self.color}

    @classmethod
    def from_dict(cls, record: dict) -> ClassSpec:
        return cls(record["index"], record["name"], record["color"])


def class_specs(classes: list[dict]) -> list[ClassSpec]:
    """The specs of a manifest's or a model's `classes` records."""
    return [ClassSpec.from_dict(record) for record in classes]


def classes_from_names(names: list[str], colors: dict[str, str] | None = None) -> list[ClassSpec]:
    """Background plus `names` in order, coloured from `colors` or the palette."""
    colors = colors or {}
    specs = [ClassSpec(0, "background", PALETTE[0])]
    for i, name in enumerate(names, start=1):
        specs.append(ClassSpec(i, name, colors.get(name, PALETTE[i % len(PALETTE)])))
    return specs


def class_names(classes: list[ClassSpec] | list[dict] | list[str]) -> list[str]:
    return [c if isinstance(c, str) else c.name if isinstance(c, ClassSpec) else c["name"] for c in classes]


def names_by_index(classes: list[dict]) -> dict[int, str]:
    return {c["index"]: c["name"] for c in classes}


def check_same_names(ours: list, ours_name: str, theirs: list, theirs_name: str) -> None:
    """One line when two class lists (specs, records or names) do not name the same classes in the same order."""
    ours, theirs = class_names(ours), class_names(theirs)
    if ours != theirs:
        raise UserError(f"{theirs_name}: its classes {theirs} differ from {ours_name}'s {ours}")


def id2label(classes: list[ClassSpec] | list[dict]) -> dict[str, str]:
    specs = [c if isinstance(c, ClassSpec) else ClassSpec.from_dict(c) for c in classes]
    return {str(spec.index): spec.name for spec in specs}


def write_id2label(folder: Path, classes: list[ClassSpec] | list[dict]) -> None:
    write_json(Path(folder) / ID2LABEL, id2label(classes))


def names_from_id2label(id2label_: dict, source: str) -> list[str]:
    """The class names of an `id2label.json`, in index order; one line unless its keys are 0..K-1."""
    if not id2label_ or not isinstance(id2label_, dict) or set(id2label_) != {str(i) for i in range(len(id2label_))}:
        keys = sorted(id2label_, key=lambda k: (len(k), k)) if isinstance(id2label_, dict) else id2label_
        raise UserError(f"{source}: id2label.json does not name classes 0..K-1 (keys {keys})")
    names = [id2label_[str(i)] for i in range(len(id2label_))]
    if not all(isinstance(name, str) and name for name in names) or len(set(names)) != len(names):
        raise UserError(f"{source}: id2label.json must give each class a distinct, non-empty name (names {names})")
    return names


def palette(classes: list[ClassSpec]) -> np.ndarray:
    """(256, 3) uint8: each class index its colour, the rest (ignore included) white."""
    table = np.full((256, 3), 255, np.uint8)
    for spec in classes:
        table[spec.index] = [int(spec.color[i:i + 2], 16) for i in (1, 3, 5)]
    table[IGNORE] = 255
    return table


def colorize(labels: np.ndarray, classes: list[ClassSpec]) -> np.ndarray:
    return palette(classes)[labels]


def centroids_digest(centroids: np.ndarray) -> str:
    """A digest of the centroids' values (rounded to 4 decimals; -0 and 0 alike), in their order."""
    values = np.round(np.asarray(centroids, np.float64), 4) + 0.0
    return hashlib.sha256(values.tobytes() + str(values.shape).encode()).hexdigest()[:16]


def class_fingerprint(classes: list[dict], centroids: str | None = None, encoder: str | None = None) -> dict:
    """The fingerprint of `classes` ({"index", "name", "color"} in index order) and, for pseudo-maps, the
    digest of the centroids that numbered them and the encoder they live in."""
    body: dict = {"classes": [[c["name"], c.get("color")] for c in classes]}
    if centroids:
        body.update(centroids=centroids, encoder=encoder)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {**body, "digest": digest}


def fingerprint_problem(fingerprint, classes: list[dict]) -> str | None:
    """Why a recorded fingerprint cannot be trusted for `classes` (it must be theirs, digest included), or None."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("centroids") or "", str):
        return f"{FINGERPRINT} is not an object with a centroids digest"
    expected = class_fingerprint(classes, fingerprint.get("centroids"), fingerprint.get("encoder"))
    if fingerprint != expected:
        return f"{FINGERPRINT} does not match its classes (edited by hand?)"
    return None


def describe(fingerprint: dict) -> str:
    names = [name for name, _ in fingerprint["classes"]]
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} classes)" if len(names) > 4 else "")
    centroids = f"; centroids {fingerprint['centroids']}" if fingerprint.get("centroids") else ""
    return f"[{shown}]{centroids}"


def check_same_classes(ours: dict | None, ours_name: str, theirs: dict | None, theirs_name: str) -> None:
    """One line when two fingerprints differ; a warning when one side has none (made before they were
    recorded: only the class names could be compared there)."""
    if ours is None or theirs is None:
        missing = ours_name if ours is None else theirs_name
        logger.warning("%s records no class fingerprint (made by an older htd-toolkit, or not part of a prepared "
                       "folder): its class ids cannot be checked against %s", missing,
                       theirs_name if ours is None else ours_name)
        return
    if ours.get("digest") != theirs.get("digest"):
        raise UserError(f"{ours_name} and {theirs_name} number their classes differently: {describe(ours)} vs "
                        f"{describe(theirs)}; class ids would mean other tissue (use data prepared with the "
                        "model's classes and centroids)")
