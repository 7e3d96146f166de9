"""One slide → its heterogeneous patches (image, exact mask, metadata) and its crop-bank crops.

Steps: overview at low resolution → tissue mask → coarse label map → candidate windows screened on
it → candidates read in blocks (one `read_region` per block of nearby windows at the best level) → exact label
map and the heterogeneity rule at patch resolution → samples; crops inside each class region for
slides of the train split. Output goes to the work folder as tars; the stats file is written last
and marks the slide as done.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.annotations import FORMATS
from htd_toolkit.classes import ClassSpec
from htd_toolkit.data.crops import crop_side_range, sample_crop_box
from htd_toolkit.data.labels import class_counts, class_fractions
from htd_toolkit.data.shards import IMAGE, MASK, META, encode_json, encode_png, tar_bytes
from htd_toolkit.errors import check_number
from htd_toolkit.files import write_atomic
from htd_toolkit.patches.heterogeneity import HeterogeneityRule
from htd_toolkit.patches.windows import grid_windows, random_windows, screen
from htd_toolkit.wsi.blocks import read_windows
from htd_toolkit.wsi.slide import Slide, SlideError, Window
from htd_toolkit.wsi.tissue import TissueParams, patch_tissue, tissue_mask

OVERVIEW_CELLS = 32  # overview pixels across one patch


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that changes what a slide yields (and so the work folder's fingerprint)."""

    format: str
    mpp: float = 0.5
    patch_size: int = 512
    min_fraction: float = 0.2
    max_fraction: float = 0.8
    min_tissue: float = 0.5
    sampling: str = "grid"
    stride: int | None = None  # output pixels between grid windows; default: the patch size
    windows_per_slide: int = 2000  # random sampling
    max_patches_per_slide: int | None = None
    crops_per_class: int = 1
    crop_size: tuple[int, int] | None = None  # --crop-size MIN,MAX px at --mpp; default: crop_side_range
    tissue_threshold: float | None = None
    seed: int = 0
    class_map: tuple[tuple[str, str], ...] = ()  # --class-map: (group, class or "exclude"), groups lower-cased
    include_detections: bool = False  # GeoJSON: QuPath detections, cells and tiles count as regions

    @property
    def rule(self) -> HeterogeneityRule:
        return HeterogeneityRule(self.min_fraction, self.max_fraction, self.min_tissue)

    def check(self) -> None:
        """One line for the first option that is NaN, infinite or out of range."""
        check_number("--mpp", self.mpp, 0.01, 1000)
        check_number("--patch-size", self.patch_size, 8, 16384)
        check_number("--stride", self.stride, 1, 16384)
        check_number("--windows-per-slide", self.windows_per_slide, 1)
        check_number("--max-patches-per-slide", self.max_patches_per_slide, 1)
        check_number("--crops-per-class", self.crops_per_class, 0, 100)
        if self.crop_size is not None:
            low, high = self.crop_size
            check_number("--crop-size MIN", low, 4, self.patch_size)
            check_number("--crop-size MAX", high, low, self.patch_size)
        check_number("--tissue-threshold", self.tissue_threshold, 0, 255)
        check_number("--min-tissue", self.min_tissue, 0, 1)
        self.rule  # noqa: B018 (validates the fractions)
        fmt = FORMATS[self.format]
        if self.class_map and hasattr(fmt, "check_class_map"):
            fmt.check_class_map(dict(self.class_map))

    def source_options(self, classes: list[ClassSpec]) -> dict:
        """What this format's annotation reader takes besides the file and the slide size."""
        options = {"classes": classes} if self.format in ("geojson", "pseudo") else {}
        if self.class_map:
            options["class_map"] = dict(self.class_map)
        if self.format == "geojson":
            options["include_detections"] = self.include_detections
        return options

    def fingerprint(self, extra: dict | None = None) -> str:
        payload = json.dumps({**asdict(self), **(extra or {})}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class SlideJob:
    path: Path
    annotation: Path | None
    slide_id: str
    split: str
    process: int = 0  # which process of a launch (or --slide-shard) extracts it


@dataclass
class SlideStats:
    slide_id: str
    split: str
    process: int = 0
    tried: int = 0
    kept: int = 0
    crops: int = 0
    rejected: Counter = field(default_factory=Counter)
    mpp_source: str = "mpp"

    def to_dict(self) -> dict:
        return {**asdict(self), "rejected": dict(sorted(self.rejected.items()))}


def work_paths(work: Path, slide_id: str) -> tuple[Path, Path, Path]:
    return work / f"{slide_id}.tar", work / f"{slide_id}.crops.tar", work / f"{slide_id}.json"


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(slide_id.encode()).hexdigest()[:8], 16)])


def candidate_windows(slide: Slide, config: ExtractConfig, rng: np.random.Generator) -> list[Window]:
    size0 = slide.level0_size(config.patch_size, config.mpp)
    if size0 > min(slide.dimensions):
        width, height = slide.dimensions
        raise SlideError(f"{slide.path.name}: {width} x {height} level-0 px is smaller than one {config.patch_size}-px "
                         f"patch at {config.mpp} µm/px ({size0} level-0 px); lower --patch-size or --mpp")
    if config.sampling == "random":
        return random_windows(slide.dimensions, size0, config.windows_per_slide, rng)
    stride0 = slide.level0_size(config.stride or config.patch_size, config.mpp)
    return grid_windows(slide.dimensions, size0, stride0)


def extract_slide(job: SlideJob, config: ExtractConfig, classes: list[ClassSpec], work: Path) -> SlideStats:
    """Process one slide into the work folder; raises a UserError naming the file on bad input."""
    rng = slide_rng(config.seed, job.slide_id)
    fmt = FORMATS[config.format]
    stats = SlideStats(job.slide_id, job.split, job.process)
    with Slide(job.path) as slide:
        stats.mpp_source = slide.mpp_source
        source = fmt(job.annotation, slide.dimensions, **config.source_options(classes))
        try:
            samples, crops = _extract(slide, source, job, config, classes, rng, stats)
        finally:
            source.close()
    samples_path, crops_path, stats_path = work_paths(work, job.slide_id)
    write_atomic(samples_path, tar_bytes(samples))
    write_atomic(crops_path, tar_bytes(crops))
    write_atomic(stats_path, json.dumps(stats.to_dict(), sort_keys=True).encode())
    return stats


def _extract(slide: Slide, source, job: SlideJob, config: ExtractConfig, classes: list[ClassSpec],
             rng: np.random.Generator, stats: SlideStats):
    overview_mpp = config.mpp * config.patch_size / OVERVIEW_CELLS
    overview, downsample = slide.overview(overview_mpp)
    tissue, threshold = tissue_mask(overview, TissueParams(threshold=config.tissue_threshold))
    coarse = source.label_box((0, 0, *slide.dimensions), overview.shape[1], overview.shape[0], tissue)
    if not tissue.any() and not (coarse > 0).any():
        raise SlideError(f"{slide.path.name}: no tissue detected (saturation threshold {threshold:.1f})")
    windows = candidate_windows(slide, config, rng)
    stats.tried = len(windows)
    candidates, rejected = screen(windows, coarse, downsample, len(classes), config.rule)
    stats.rejected.update(rejected)
    samples, crops = [], []
    size, k = config.patch_size, len(classes)
    for window, rgb in read_windows(slide, candidates, size, config.mpp):
        box = (window.x, window.y, window.size0, window.size0)
        patch_tissue_mask = None
        if source.uses_tissue:
            coarse_tissue = _coarse_crop(tissue, window, downsample, size)
            patch_tissue_mask = patch_tissue(rgb, threshold) & coarse_tissue
        labels = source.label_box(box, size, size, patch_tissue_mask)
        reason = config.rule.reject_reason(class_counts(labels, k), labels.size)
        if reason:
            stats.rejected[reason] += 1
            continue
        key = f"{job.slide_id}_{window.x}_{window.y}"
        meta = {"source": "real", "slide": job.slide_id, "x": window.x, "y": window.y,
                "level0_size": window.size0, "mpp": slide.output_mpp(config.mpp), "class_fractions": class_fractions(labels, k)}
        samples.append((key, [(IMAGE, encode_png(rgb)), (MASK, encode_png(labels)), (META, encode_json(meta))]))
        if job.split == "train":
            crops += [(key, crop) for crop in _crops(rgb, labels, window, job.slide_id, config, rng)]
    if config.max_patches_per_slide is not None and len(samples) > config.max_patches_per_slide:
        chosen = sorted(rng.choice(len(samples), config.max_patches_per_slide, replace=False).tolist())
        stats.rejected["over_cap"] += len(samples) - len(chosen)
        samples = [samples[i] for i in chosen]
    keys = {key for key, _ in samples}
    crops = [crop for key, crop in crops if key in keys]
    stats.kept, stats.crops = len(samples), len(crops)
    return samples, crops


def _coarse_crop(mask: np.ndarray, window: Window, downsample: float, size: int) -> np.ndarray:
    """The overview mask under `window`, upsampled (nearest) to size x size."""
    y0, x0 = round(window.y / downsample), round(window.x / downsample)
    side = max(1, round(window.size0 / downsample))
    cell = np.zeros((side, side), bool)
    part = mask[y0:y0 + side, x0:x0 + side]
    cell[:part.shape[0], :part.shape[1]] = part
    return np.asarray(Image.fromarray(cell).resize((size, size), Image.Resampling.NEAREST))


def _crops(rgb: np.ndarray, labels: np.ndarray, window: Window, slide_id: str, config: ExtractConfig,
           rng: np.random.Generator) -> list:
    scale = window.size0 / config.patch_size
    out, (low, high) = [], crop_side_range(config.patch_size, config.crop_size)
    for cls in sorted(int(c) for c in np.unique(labels) if 0 < c < 255):
        region = labels == cls
        for n in range(config.crops_per_class):
            box = sample_crop_box(region, rng, low, high)
            if box is None:
                break
            x, y, d = box
            key = f"{slide_id}_{window.x}_{window.y}_{n}_c{cls}"
            meta = {"class": cls, "slide": slide_id, "box": [window.x + round(x * scale), window.y + round(y * scale),
                                                             round(d * scale)], "side": d}
            out.append((key, [(IMAGE, encode_png(np.ascontiguousarray(rgb[y:y + d, x:x + d]))),
                              (META, encode_json(meta))]))
    return out
