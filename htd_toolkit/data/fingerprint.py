"""Class identity that travels with the data: the class fingerprint.

Class i of a map is only meaningful beside the definition that gave it: for annotated data the ordered
class names and colours, for pseudo-maps also the k-means centroids (and the encoder) that numbered the
tissue types. Names alone ("tissue type 001") match across runs whose clusters are numbered differently,
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

import numpy as np

from htd_toolkit.errors import UserError

logger = logging.getLogger(__name__)
FIELD = "class_fingerprint"


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
        return f"{FIELD} is not an object with a centroids digest"
    expected = class_fingerprint(classes, fingerprint.get("centroids"), fingerprint.get("encoder"))
    if fingerprint != expected:
        return f"{FIELD} does not match its classes (edited by hand?)"
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
