"""Annotation formats → class label maps. One small module per format; `FORMATS` is the registry.

Each format brings its class list (index 0 is always background) with names and colours, and
rasterises a level-0 box of a slide into a uint8 label map of any output size.
"""

from htd_toolkit.annotations.base import AnnotationError, AnnotationSource
from htd_toolkit.annotations.camelyon16 import Camelyon16XML
from htd_toolkit.annotations.geojson import GeoJSONAnnotations
from htd_toolkit.annotations.panda import PANDA_KAROLINSKA, PANDA_RADBOUD, PandaMask
from htd_toolkit.annotations.pseudo import PseudoMapSource

FORMATS = {
    "camelyon16": Camelyon16XML,
    "pseudo": PseudoMapSource,
    "panda-radboud": PANDA_RADBOUD,
    "panda-karolinska": PANDA_KAROLINSKA,
    "geojson": GeoJSONAnnotations,
}

__all__ = ["FORMATS", "AnnotationError", "AnnotationSource", "Camelyon16XML", "GeoJSONAnnotations",
           "PandaMask"]
