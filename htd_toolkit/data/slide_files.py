"""The file set of a synthetic whole slide: `NAME.tif` and what `generate-slide` writes beside it
(docs/formats.md, "The whole-slide file set"). `generate-slide` writes it, `push` publishes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SlideFiles:
    """`slide.tif` and what is written beside it."""

    image: Path

    def _sibling(self, suffix: str) -> Path:
        return self.image.with_name(self.image.stem + suffix)

    @property
    def mask(self) -> Path:
        return self._sibling(".mask.tif")

    @property
    def regions(self) -> Path:
        return self._sibling(".geojson")

    @property
    def provenance(self) -> Path:
        return self._sibling(".json")

    @property
    def thumbnail(self) -> Path:
        return self._sibling(".thumbnail.png")

    @property
    def work(self) -> Path:
        return self._sibling(".work")

    def outputs(self) -> list[Path]:
        return [self.image, self.mask, self.regions, self.provenance, self.thumbnail]
