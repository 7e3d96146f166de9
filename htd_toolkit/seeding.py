"""Seeds derived from named parts, so that every random draw is a pure function of what it is for."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 60-bit seed from any parts (seed, epoch, step, key, ...): stable across runs and machines."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)
