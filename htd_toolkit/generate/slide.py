"""`htd-toolkit generate-slide`: a slide-sized class map → a synthetic whole-slide image and its exact mask.

Tiled latent diffusion as MultiDiffusion (Bar-Tal et al., 2023) does it: overlapping windows cover the
slide's latent; at every denoising step each window that holds tissue predicts its noise from its part of
the map and the slide's crops (one per class, drawn once, seeded and recorded), the predictions are
weighted by a ramp that falls towards each window's edges and averaged where windows overlap, and the
scheduler steps the whole latent once. No window ever sees an edge its neighbours do not share, so no
seams. Windows without tissue are never denoised; their pixels are real glass: a canvas of the model's
glass-bank tiles over the whole slide (`SlideGlass`, each row of tiles drawn from its own seed). With
`--keep-glass` the map's background inside tissue windows is kept glass as `generate --keep-glass` keeps it
(`models/background.py`): after decoding every background pixel of the full-resolution mask is the
canvas's, so the glass's outline is the mask's, not the window grid's nor the latent cells', and the
tissue is the model's own.

Memory is bounded by a band of rows, not the slide: latents, blended noise and pixels live in
`RawArray` files under `<stem>.work/`; the scheduler is DDIM, whose step is elementwise and stateless and
so runs band by band (a multistep scheduler such as UniPC keeps a history of the whole latent); the VAE
decodes window by window, blended by the same ramps in a rolling band of rows; and each pyramid level
is made from the one before, band by band (`wsi.pyramid.write_streamed_pyramid`).

An interrupted run resumes at its last finished denoising step (the latents of two steps are kept,
double-buffered, so a half-written step is never read) and ends with the same bytes as an
uninterrupted one; decoding and writing the pyramids, a small part of the work, are done again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from bisect import bisect_left, bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from htd_toolkit import __version__
from htd_toolkit.classes import (
    IGNORE,
    check_same_classes,
    check_same_names,
    class_specs,
    colorize,
    names_by_index,
)
from htd_toolkit.data.shards import open_image
from htd_toolkit.data.slide_files import SlideFiles
from htd_toolkit.data.sources import CropBank, crop_bank_for, crop_bank_sha256
from htd_toolkit.distributed import barrier, process_share
from htd_toolkit.errors import UserError, check_number
from htd_toolkit.files import write_atomic
from htd_toolkit.generate import GENERATION_FLAGS
from htd_toolkit.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, check_generation_settings
from htd_toolkit.models.background import GlassTiles
from htd_toolkit.seeding import derive_seed
from htd_toolkit.wsi.pyramid import write_streamed_pyramid
from htd_toolkit.wsi.raw import RawArray

logger = logging.getLogger(__name__)
MAP_SUFFIXES = (".png", ".tif", ".tiff", ".npz")
THUMBNAIL_SIDE = 1024
ANNOTATED_MAP_CELL = 8  # a real slide's annotation is drawn with cells of 8 slide pixels unless --map-mpp says


@dataclass
class SlideOptions:
    model: str
    map: Path
    out: Path  # the slide, e.g. slide.tif; its mask, regions, provenance and thumbnail are written beside it
    crop_bank: Path | None = None
    mpp: float | None = None  # microns per pixel of the slide (default: the model's)
    map_mpp: float | None = None  # of the map (default: the slide's)
    tile: int | None = None  # window side in pixels (default: the model's resolution)
    overlap: int | None = None  # pixels shared by neighbouring windows (default: a quarter of the tile)
    steps: int = NUM_INFERENCE_STEPS
    guidance: float = GUIDANCE_SCALE
    seed: int = 0
    batch_size: int = 8
    revision: str | None = None
    base_model: str | None = None
    compression: str = "jpeg"
    overwrite: bool = False
    annotation: Path | None = None  # with it, --map is a real slide and this its annotation file
    annotation_format: str | None = None  # any format `prepare annotated` reads
    class_map: str | None = None  # --class-map GROUP=CLASS,...
    keep_glass: bool = False  # keep the map's background the model's real glass (models/background.py): opt-in

    def check(self) -> None:
        check_number("--batch-size", self.batch_size, 1)
        check_generation_settings(self.steps, self.guidance, GENERATION_FLAGS)
        check_number("--mpp", self.mpp, 0, above=True)
        check_number("--map-mpp", self.map_mpp, 0, above=True)
        check_number("--tile", self.tile, 8, 4096)  # a window's UNet activations grow with its area
        check_number("--overlap", self.overlap, 0, 4096)
        if self.out.suffix.lower() not in (".tif", ".tiff"):
            raise UserError(f"--out {self.out}: a slide is written as a .tif")
        if self.compression not in ("jpeg", "zlib"):
            raise UserError(f"unknown --compression {self.compression!r}: choose jpeg or zlib")
        if (self.annotation is None) != (self.annotation_format is None):
            raise UserError("--annotation and --format go together: a real slide's annotation and its format")

    def fingerprint(self, map_sha: str, model: dict) -> dict:
        """What determines the bytes: everything but paths and batching; `model` is its `model_identity`."""
        keep = ("revision", "mpp", "map_mpp", "tile", "overlap", "steps", "guidance", "seed", "compression",
                "annotation_format", "class_map", "keep_glass")
        return {**{k: v for k, v in asdict(self).items() if k in keep}, **model, "map_sha256": map_sha,
                "crop_bank_sha256": crop_bank_sha256(self.crop_bank)}


class SlideMap:
    """A class-id grid and the whole number of slide pixels each of its cells covers."""

    def __init__(self, grid: np.ndarray, scale: int):
        self.grid, self.scale = grid, scale

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape[0] * self.scale, self.grid.shape[1] * self.scale

    def window(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Slide pixels [top, top + height) x [left, left + width) of the map; background beyond it."""
        rows, columns = np.arange(top, top + height) // self.scale, np.arange(left, left + width) // self.scale
        inside = (rows < self.grid.shape[0])[:, None] & (columns < self.grid.shape[1])[None, :]
        out = self.grid[np.minimum(rows, self.grid.shape[0] - 1)][:, np.minimum(columns, self.grid.shape[1] - 1)]
        return np.where(inside, out, 0).astype(np.uint8)

    def sampled(self, step: int) -> np.ndarray:
        """Every `step`-th slide pixel of the map in both directions (a thumbnail's labels, never the slide)."""
        height, width = self.shape
        return self.grid[np.arange(0, height, step) // self.scale][:, np.arange(0, width, step) // self.scale]

    def tissue_classes(self) -> list[int]:
        return [int(c) for c in np.unique(self.grid) if 0 < c < IGNORE]


def read_map_grid(path: Path, num_classes: int) -> np.ndarray:
    """A class-id image (PNG/TIFF) or a pseudo-map from `prepare unannotated` (.npz), checked."""
    if not path.is_file():
        raise UserError(f"--map {path}: file not found")
    if path.suffix.lower() not in MAP_SUFFIXES:
        raise UserError(f"--map {path}: expected a class-id image ({', '.join(MAP_SUFFIXES)})")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path) as data:
                grid = np.asarray(data["grid"])
        elif path.suffix.lower() == ".png":
            grid = np.asarray(open_image(path, f"--map {path}", formats=("PNG",)))
        else:
            import tifffile

            grid = tifffile.imread(path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--map {path}: unreadable ({type(err).__name__}: {err})") from err
    if grid.ndim == 3 and grid.shape[2] == 1:
        grid = grid[..., 0]
    if grid.ndim != 2 or not np.issubdtype(grid.dtype, np.integer):
        raise UserError(f"--map {path}: expected one channel of integer class ids, got {grid.dtype} {grid.shape}")
    bad = np.unique(grid[(grid >= num_classes) & (grid != IGNORE) | (grid < 0)])
    if len(bad):
        raise UserError(f"--map {path}: class id {int(bad[0])} is not one of the model's {num_classes} classes")
    return grid.astype(np.uint8)


def recorded_centroids(path: Path) -> str | None:
    """The centroids digest a pseudo-map .npz records (a text scalar), or None."""
    with np.load(path) as data:
        try:
            value = data["centroids"] if "centroids" in data.files else None
        except ValueError:  # an object array: never unpickled
            return None
    if value is None or value.ndim != 0 or value.dtype.kind not in "SU":
        return None
    value = value.item()
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def check_map_centroids(path: Path, model_fingerprint: dict | None) -> None:
    """A pseudo-map (.npz from `prepare unannotated`) numbers its classes by the centroids it was assigned
    with: they must be the ones the model's training data was numbered by."""
    if path.suffix.lower() != ".npz" or not (model_fingerprint or {}).get("centroids"):
        return
    theirs = recorded_centroids(path)
    if theirs is None:
        logger.warning("--map %s records no centroids: whether its class ids are the model's cannot be checked",
                       path)
    elif theirs != model_fingerprint["centroids"]:
        raise UserError(f"--map {path}: assigned with centroids {theirs}, but the model's classes were numbered by "
                        f"centroids {model_fingerprint['centroids']}; class ids would mean other tissue")


def annotated_slide_grid(options: SlideOptions, classes: list[dict]) -> np.ndarray:
    """The class map of a real slide (`--map`) and its annotation at `--map-mpp`, as `prepare annotated` draws
    it: annotated regions by the format's rules, unannotated tissue where the format gives it a class."""
    from htd_toolkit.annotations import FORMATS
    from htd_toolkit.annotations.base import parse_class_map
    from htd_toolkit.patches.extract import ExtractConfig
    from htd_toolkit.wsi.slide import Slide
    from htd_toolkit.wsi.tissue import TissueParams, tissue_mask

    if options.annotation_format not in FORMATS:
        raise UserError(f"--format {options.annotation_format!r}: choose one of {', '.join(FORMATS)}")
    if not options.annotation.is_file():
        raise UserError(f"--annotation {options.annotation}: file not found")
    config = ExtractConfig(format=options.annotation_format, class_map=parse_class_map(options.class_map))
    config.check()
    specs = class_specs(classes)
    with Slide(options.map) as slide:
        overview, _ = slide.overview(options.map_mpp)
        tissue, _ = tissue_mask(overview, TissueParams())
        source = FORMATS[options.annotation_format](options.annotation, slide.dimensions,
                                                    **config.source_options(specs))
        try:
            grid = source.label_box((0, 0, *slide.dimensions), overview.shape[1], overview.shape[0], tissue)
        finally:
            source.close()
    check_same_names(classes, "the model", source.classes, f"--annotation {options.annotation}")
    return grid


def map_scale(map_mpp: float, mpp: float, path: Path) -> int:
    scale = map_mpp / mpp
    if abs(scale - round(scale)) > 1e-6 or round(scale) < 1:
        raise UserError(f"--map {path}: its {map_mpp} µm per pixel is not a whole multiple of the slide's {mpp}")
    return round(scale)


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts of windows of `size` covering [0, length) with `stride`, the last flush with the end."""
    starts = list(range(0, max(length - size, 0) + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def ramp(size: int, overlap: int) -> np.ndarray:
    """Blending weight along one side of a window: 1 inside, falling linearly over `overlap` cells towards
    each edge, never 0 (a cell only one window covers takes that window's value whatever its weight)."""
    if overlap <= 0:
        return np.ones(size, np.float32)
    edge = np.minimum(np.arange(size) + 1, size - np.arange(size)).astype(np.float32)
    return np.clip(edge / (overlap + 1), 1 / (overlap + 1), 1.0)


@dataclass
class WindowPlan:
    """Windows on the latent grid: `rows` lists (top, [lefts of the windows holding tissue])."""

    latent: tuple[int, int]  # canvas size in latent cells (the slide, padded to the tile and the VAE factor)
    size: int  # window side in latent cells
    stride: int  # latent cells between window starts
    factor: int  # pixels per latent cell
    rows: list[tuple[int, list[int]]]

    @property
    def tissue_windows(self) -> int:
        return sum(len(lefts) for _, lefts in self.rows)

    @property
    def windows(self) -> int:
        return len(self.rows) * len(window_starts(self.latent[1], self.size, self.stride))

    def denoised(self, first: int, last: int) -> np.ndarray:
        """(last - first, width) bool: the latent cells of rows [first, last) that some tissue window covers."""
        covered = np.zeros((last - first, self.latent[1]), bool)
        tops = [top for top, _ in self.rows]  # ascending: only the rows of windows that meet the band
        for top, lefts in self.rows[bisect_right(tops, first - self.size):bisect_left(tops, last)]:
            rows = slice(max(top, first) - first, min(top + self.size, last) - first)
            for left in lefts:
                covered[rows, left:left + self.size] = True
        return covered


def plan_windows(slide_map: SlideMap, tile: int, overlap: int, factor: int) -> WindowPlan:
    if tile % factor or overlap % factor or not 0 <= overlap < tile:
        raise UserError(f"--tile {tile} and --overlap {overlap}: both must be multiples of the VAE factor {factor}, "
                        "the overlap smaller than the tile")
    height, width = slide_map.shape
    size, stride = tile // factor, (tile - overlap) // factor
    latent = (max(math.ceil(height / factor), size), max(math.ceil(width / factor), size))
    rows = []
    for top in window_starts(latent[0], size, stride):
        lefts = [left for left in window_starts(latent[1], size, stride)
                 if has_tissue(slide_map.window(top * factor, left * factor, tile, tile))]
        rows.append((top, lefts))
    return WindowPlan(latent, size, stride, factor, rows)


def work_bytes(shape: tuple[int, int], factor: int, channels: int, world: int) -> int:
    """Disk a slide of `shape` pixels takes while it is made: pixels and mask with their pyramid levels,
    the two latent buffers, each process's noise and weight sums, and the finished TIFFs (about a byte a
    pixel, uncompressed, as an upper bound)."""
    pixels = shape[0] * shape[1]
    cells = math.ceil(shape[0] / factor) * math.ceil(shape[1] / factor)
    return pixels * 4 * 4 // 3 + cells * 4 * (2 * channels + world * (channels + 1)) + pixels


def check_disk(shape: tuple[int, int], factor: int, channels: int, work: Path, map_path: Path) -> None:
    """One line, before any work, when the slide cannot fit on the disk (a --map-mpp typo makes a
    slide of 10^10 pixels a side); what an interrupted run already wrote counts as available."""
    needed = work_bytes(shape, factor, channels, process_share()[1])
    written = sum(f.stat().st_blocks * 512 for f in work.glob("*") if f.is_file()) if work.is_dir() else 0
    folder = next(p for p in (work, *work.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if needed > free + written:
        raise UserError(f"--map {map_path}: the slide would be {shape[1]:,} x {shape[0]:,} px and needs about "
                        f"{needed / 1e9:,.1f} GB on the disk of {folder.resolve()}, which has {free / 1e9:,.1f} GB free "
                        "(check --map-mpp and --mpp)")


def has_tissue(labels: np.ndarray) -> bool:
    return bool(((labels > 0) & (labels != IGNORE)).any())


def draw_crops(bank: CropBank | None, classes: list[int], names: dict[int, str], seed: int):
    """One crop per tissue class of the slide, seeded: (crops by class, records for slide.json)."""
    if bank is None:
        return {}, []
    return bank.draw_crops(classes, np.random.default_rng(derive_seed(seed, "slide-crops")), names)


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Denoiser:
    """The denoising loop over the whole latent, its state on disk.

    Under `accelerate launch` process r of W predicts the windows of window rows r, r + W, ... into its own
    noise and weight sums; after a barrier each process steps every W-th band of the latent from the sums
    of all processes, and after a second barrier the main process records the step.
    """

    def __init__(self, pipe, plan: WindowPlan, slide_map: SlideMap, crops: dict, options: SlideOptions,
                 work: Path):
        from diffusers import DDIMScheduler

        self.pipe, self.plan, self.slide_map, self.crops, self.options, self.work = \
            pipe, plan, slide_map, crops, options, work
        self.rank, self.world = process_share()
        self.scheduler = DDIMScheduler.from_config(pipe.model.scheduler_config)
        self.scheduler.set_timesteps(options.steps)
        channels = pipe.model.unet.config.in_channels
        self.latents = [RawArray(work / f"latents{i}.f32", (*plan.latent, channels)) for i in (0, 1)]
        self.weights = np.outer(*(ramp(plan.size, (options.overlap or 0) // plan.factor),) * 2)
        self.glass = SlideGlass(pipe.glass_tiles, options.seed, plan.latent[1] * plan.factor)
        self.state_path = work / "state.json"
        self.predicted = 0  # window predictions this process made in this run

    def finished_steps(self) -> int:
        if not self.state_path.exists():
            return 0
        return int(json.loads(self.state_path.read_text())["steps_done"])

    def sums(self, rank: int) -> tuple[RawArray, RawArray]:
        shape = self.latents[0].shape
        return (RawArray(self.work / f"noise.r{rank}.f32", shape),
                RawArray(self.work / f"weight.r{rank}.f32", (*shape[:2], 1)))

    def noise_rows(self, top: int, bottom: int) -> np.ndarray:
        """Each latent row's starting noise from its own seed: the same whatever the bands, windows or processes."""
        width, channels = self.latents[0].shape[1:]
        return np.stack([np.random.default_rng(derive_seed(self.options.seed, "slide-noise", y))
                         .standard_normal((width, channels), np.float32) for y in range(top, bottom)])

    def start_noise(self) -> None:
        if self.rank == 0:
            target = RawArray.create(self.latents[0].path, self.latents[0].shape)
            for top, bottom in target.bands(256):
                target.write(top, self.noise_rows(top, bottom) * self.scheduler.init_noise_sigma)
            write_atomic(self.state_path, json.dumps({"steps_done": 0}).encode())
        barrier()

    def run(self, advance=None) -> RawArray:
        """Finish the denoising; returns the final latents."""
        started = self.state_path.exists()
        barrier()  # every process has looked before the main one writes the state
        if not started:
            self.start_noise()
        for step in range(self.finished_steps(), self.options.steps):
            self.step(step, advance)
            barrier()
            if self.rank == 0:
                write_atomic(self.state_path, json.dumps({"steps_done": step + 1}).encode())
            barrier()
        write_atomic(self.work / f"process{self.rank}.json", json.dumps({"predicted": self.predicted}).encode())
        barrier()
        return self.latents[self.options.steps % 2]

    def predictions_by_process(self) -> list[int]:
        """Window predictions each process made in this run (the main process reads them after `run`)."""
        return [json.loads((self.work / f"process{r}.json").read_text())["predicted"] for r in range(self.world)]

    def step(self, index: int, advance=None) -> None:
        t = self.scheduler.timesteps[index]
        self.predict(t, index % 2, advance)
        barrier()
        source, target = self.latents[index % 2], self.latents[(index + 1) % 2]
        if self.rank == 0:
            RawArray.create(target.path, source.shape)
        barrier()
        sums = [self.sums(rank) for rank in range(self.world)]
        for band, (top, bottom) in enumerate(source.bands(256)):
            if band % self.world == self.rank:
                noise = sum(n.read(top, bottom) for n, _ in sums)
                weight = sum(w.read(top, bottom) for _, w in sums)
                self.scheduler_step(index, source.read(top, bottom), noise, weight, target, top)

    def predict(self, t, buffer: int, advance=None) -> None:
        """This process's window rows: their blended noise estimates and weights, summed into its files."""
        source = self.latents[buffer]
        noise_sum, weight_sum = (RawArray.create(a.path, a.shape) for a in self.sums(self.rank))
        size, f = self.plan.size, self.plan.factor
        for top, lefts in self.plan.rows[self.rank::self.world]:
            if not lefts:
                continue
            band, noise, weight = source.read(top, top + size), noise_sum.read(top, top + size), \
                weight_sum.read(top, top + size)
            for chunk in batches(lefts, self.options.batch_size):
                x = torch.from_numpy(np.stack([band[:, left:left + size] for left in chunk])).permute(0, 3, 1, 2)
                maps = [self.slide_map.window(top * f, left * f, size * f, size * f) for left in chunk]
                predicted = self.pipe.noise_prediction(x, t, semantic_map=maps, crops=[self.crops] * len(chunk),
                                                       guidance_scale=self.options.guidance)
                predicted = predicted.float().permute(0, 2, 3, 1).cpu().numpy()
                for left, value in zip(chunk, predicted, strict=True):
                    noise[:, left:left + size] += value * self.weights[..., None]
                    weight[:, left:left + size, 0] += self.weights
                self.predicted += len(chunk)
                if advance:
                    advance(len(chunk))
            noise_sum.write(top, noise)
            weight_sum.write(top, weight)

    def scheduler_step(self, index: int, latents: np.ndarray, noise: np.ndarray, weight: np.ndarray,
                       target: RawArray, top: int) -> None:
        """The blended noise estimate → DDIM's next latents for one band; cells no window covers stay."""
        covered = weight > 0
        blended = np.where(covered, noise / np.maximum(weight, 1e-12), 0.0).astype(np.float32)
        step = self.scheduler.step(torch.from_numpy(blended).permute(2, 0, 1)[None], self.scheduler.timesteps[index],
                                   torch.from_numpy(latents).permute(2, 0, 1)[None], return_dict=False)[0]
        target.write(top, np.where(covered, step[0].permute(1, 2, 0).numpy(), latents))


class SlideGlass:
    """The slide's real glass: a canvas of glass-bank tiles (a tile and a flip per cell) over the whole
    slide, each row of cells drawn from its own seed, so that any band of rows is the same glass whatever
    the bands, windows or processes."""

    def __init__(self, tiles: GlassTiles, seed: int, width: int):
        self.tiles, self.seed, self.width = tiles, seed, width
        self.columns = tiles.cells(1, width)[1]

    def codes(self, first: int, last: int) -> torch.Tensor:
        """(last - first, columns) codes of canvas cell rows [first, last)."""
        return torch.stack([self.tiles.draw(1, self.columns, torch.Generator().manual_seed(
            derive_seed(self.seed, "slide-glass", row)))[0] for row in range(first, last)])

    def pixels(self, top: int, bottom: int) -> np.ndarray:
        """(bottom - top, width, 3) uint8: the canvas's pixel rows [top, bottom)."""
        side = self.tiles.side
        canvas = self.tiles.pixels(self.codes(top // side, -(-bottom // side)))
        return canvas[:, top % side:top % side + bottom - top, :self.width].permute(1, 2, 0).numpy()

    def latents(self, top: int, bottom: int) -> np.ndarray:
        """(bottom - top, latent width, C) float32: the canvas's latent rows [top, bottom)."""
        side = self.tiles.side // self.tiles.factor
        canvas = self.tiles.latents(self.codes(top // side, -(-bottom // side)))
        rows = canvas[:, top % side:top % side + bottom - top, :self.width // self.tiles.factor]
        return rows.permute(1, 2, 0).numpy()


class RowBlender:
    """Decoded windows blended by weight in a rolling band of pixel rows; finished rows go to `out`."""

    def __init__(self, rows: int, width: int, out: RawArray, background):
        self.top, self.out, self.background = 0, out, background  # background(top, bottom): pixels of those rows
        self.sum = np.zeros((rows, width, 3), np.float32)
        self.weight = np.zeros((rows, width), np.float32)

    def add(self, top: int, left: int, image: np.ndarray, weight: np.ndarray) -> None:
        rows, columns = image.shape[:2]
        self.sum[top - self.top:top - self.top + rows, left:left + columns] += image * weight[..., None]
        self.weight[top - self.top:top - self.top + rows, left:left + columns] += weight

    def flush(self, until: int) -> None:
        """Rows [top, until) are final: normalised (background where nothing was decoded) and written."""
        count = min(until, self.out.shape[0]) - self.top
        if count > 0:
            weight = self.weight[:count, :self.out.shape[1], None]
            rgb = np.where(weight > 0, self.sum[:count, :self.out.shape[1]] / np.maximum(weight, 1e-12),
                           self.background(self.top, self.top + count)[:, :self.out.shape[1]])
            self.out.write(self.top, np.clip(np.round(rgb), 0, 255).astype(np.uint8))
        shift = until - self.top
        self.sum = np.concatenate([self.sum[shift:], np.zeros_like(self.sum[:shift])])
        self.weight = np.concatenate([self.weight[shift:], np.zeros_like(self.weight[:shift])])
        self.top = until


def decoder_band(latents: RawArray, plan: WindowPlan, top: int, context: int, glass: SlideGlass) -> np.ndarray:
    """Latent rows [top - context, top + size + context) with `context` columns either side, edges replicated;
    cells no window denoised hold the glass canvas's latents, so that the decoder sees glass there, not noise."""
    first, last = max(0, top - context), min(plan.latent[0], top + plan.size + context)
    band = latents.read(first, last)
    band = np.where(plan.denoised(first, last)[..., None], band, glass.latents(first, last))
    return np.pad(band, ((first - (top - context), top + plan.size + context - last), (context, context), (0, 0)),
                  mode="edge")


@torch.no_grad()
def decode(pipe, plan: WindowPlan, latents: RawArray, rgb: RawArray, options: SlideOptions, glass: SlideGlass,
           advance=None) -> None:
    """Each tissue window's latents through the VAE decoder with `overlap` of context on every side (the
    decoder's output near its input's edge is unreliable: that part is decoded but dropped), blended with
    the denoising's ramps."""
    vae, size, f = pipe.model.vae, plan.size, plan.factor
    tile, context = size * f, (options.overlap or 0) // f
    weights = np.outer(*(ramp(tile, options.overlap or 0),) * 2)
    blender = RowBlender(tile, plan.latent[1] * f, rgb, glass.pixels)
    for top, lefts in plan.rows:
        blender.flush(top * f)
        if not lefts:
            continue
        band = decoder_band(latents, plan, top, context, glass)
        for chunk in batches(lefts, options.batch_size):
            z = torch.from_numpy(np.stack([band[:, left:left + size + 2 * context] for left in chunk]))
            z = z.permute(0, 3, 1, 2).to(pipe.device, vae.dtype) / vae.config.scaling_factor
            images = vae.decode(z, return_dict=False)[0].float().clamp(-1, 1).add(1).mul(127.5)
            images = images[:, :, context * f:context * f + tile, context * f:context * f + tile]
            for left, image in zip(chunk, images.permute(0, 2, 3, 1).cpu().numpy(), strict=True):
                blender.add(top * f, left * f, image, weights)
            if advance:
                advance(len(chunk))
    blender.flush(plan.latent[0] * f)


def paint_glass_at_mask(rgb: RawArray, slide_map: SlideMap, glass: SlideGlass) -> None:
    """Every background pixel of the slide's full-resolution mask the glass canvas's, band by band: the
    glass's outline is the mask's."""
    for top, bottom in rgb.bands(1024):
        background = slide_map.window(top, 0, bottom - top, rgb.shape[1]) == 0
        if background.any():
            band = rgb.read(top, bottom)
            band[background] = glass.pixels(top, bottom)[:, :rgb.shape[1]][background]
            rgb.write(top, band)


def write_mask_level0(slide_map: SlideMap, target: RawArray) -> None:
    for top, bottom in target.bands(1024):
        target.write(top, slide_map.window(top, 0, bottom - top, target.shape[1])[..., None])


def region_features(slide_map: SlideMap, classes: list[dict]) -> dict:
    """The map's regions as a QuPath-readable GeoJSON FeatureCollection in slide pixels: one polygon (with
    its holes) per 4-connected region, on the pixels' edges, so that it rasterises back to the mask."""
    from rasterio.features import shapes
    from rasterio.transform import Affine

    names = {c["index"]: (c["name"], c["color"]) for c in classes}
    tissue = (slide_map.grid > 0) & (slide_map.grid != IGNORE)
    features = []
    for geometry, value in shapes(slide_map.grid, mask=tissue, connectivity=4,
                                  transform=Affine.scale(slide_map.scale)):
        name, colour = names[int(value)]
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        geometry = {"type": "Polygon", "coordinates": [[[int(x), int(y)] for x, y in ring]
                                                       for ring in geometry["coordinates"]]}
        features.append({"type": "Feature", "geometry": geometry,
                         "properties": {"objectType": "annotation", "classification": {"name": name, "color": rgb},
                                        "class_id": int(value)}})
    return {"type": "FeatureCollection", "features": features}


def thumbnail(rgb: RawArray, slide_map: SlideMap, classes: list[dict]) -> Image.Image:
    """The slide beside its map, the longer side at most THUMBNAIL_SIDE each."""
    step = max(1, math.ceil(max(rgb.shape[:2]) / THUMBNAIL_SIDE))
    rows = [rgb.read(top, bottom)[(-top) % step::step, ::step] for top, bottom in rgb.bands(256)]
    image = np.concatenate(rows)
    labels = slide_map.sampled(step)
    specs = class_specs(classes)
    gap = np.full((image.shape[0], 8, 3), 255, np.uint8)
    return Image.fromarray(np.concatenate([image, gap, colorize(labels, specs)], axis=1))


def grid_sha256(grid: np.ndarray) -> str:
    """What names the map in provenance: a checksum of its class ids and shape, never its file name."""
    return hashlib.sha256(np.ascontiguousarray(grid).tobytes() + str(grid.shape).encode()).hexdigest()


def read_provenance(files: SlideFiles) -> dict | None:
    """The slide's provenance when it is one of ours (a file beside the slide may be the user's)."""
    try:
        provenance = json.loads(files.provenance.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return provenance if isinstance(provenance, dict) and "toolkit_version" in provenance else None


def already_made(files: SlideFiles, fingerprint: dict) -> bool:
    return files.image.exists() and (read_provenance(files) or {}).get("options") == fingerprint


def refuse_inputs(files: SlideFiles, inputs: tuple[Path | None, ...]) -> None:
    """None of the slide's files (nor its work folder) is a file the run reads."""
    from htd_toolkit.data.outputs import resolved

    written = {resolved(path): path for path in files.outputs()}
    for path in (p for p in inputs if p is not None and p.exists()):
        source = resolved(path)
        clash = written.get(source) or (files.work if source.is_relative_to(resolved(files.work)) else None)
        if clash is not None:
            raise UserError(f"--out {files.image}: would write {clash}, which the run reads; an input is never "
                            "an output, --overwrite or not: choose another --out")


def work_record(files: SlideFiles) -> dict | None:
    """The options of the unfinished slide in the work folder, or None."""
    try:
        return json.loads((files.work / "options.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def check_outputs(files: SlideFiles, fingerprint: dict, overwrite: bool) -> None:
    """Before anything is written: the slide's files are new, this run's own (an unfinished slide with these
    options) or, with --overwrite, to be replaced; a work folder that is not one of ours is never removed."""
    if work_record(files) == fingerprint:
        return
    if files.work.is_dir() and any(files.work.iterdir()) and work_record(files) is None:
        raise UserError(f"{files.work}: not a work folder of generate-slide; move it away or choose another --out")
    present = [path.name for path in files.outputs() if path.exists() or path.is_symlink()]
    if overwrite or not (present or work_record(files)):
        return
    if read_provenance(files) is not None and files.image.exists():
        raise UserError(f"{files.image}: a slide made with other options is there; pass --overwrite or "
                        "choose another --out")
    if work_record(files) is not None:
        raise UserError(f"{files.work}: an unfinished slide with other options; pass --overwrite to start again")
    raise UserError(f"{files.image}: {', '.join(present)} already there, not written by generate-slide with these "
                    "options; choose another --out or pass --overwrite to replace them")


def claim_outputs(files: SlideFiles, fingerprint: dict) -> None:
    """After every check: clear another run's slide files (checked by check_outputs) and record this run."""
    if work_record(files) == fingerprint:
        return
    for path in files.outputs():
        if path.is_symlink() or path.is_file():
            path.unlink()
    shutil.rmtree(files.work, ignore_errors=True)
    files.work.mkdir(parents=True)
    write_atomic(files.work / "options.json", json.dumps(fingerprint, sort_keys=True).encode())


def generate_slide(options: SlideOptions, bar=None) -> dict:
    """Make (or finish) the slide; returns its provenance (slide.json)."""
    from htd_toolkit.generate.bundle import local_paths, model_identity
    from htd_toolkit.models.htd_model import HTDConfig, model_folder
    from htd_toolkit.models.pipeline import HTDPipeline

    options.check()
    started = time.perf_counter()
    folder = model_folder(options.model, options.revision)
    files = SlideFiles(options.out)
    refuse_inputs(files, (options.map, options.annotation, options.crop_bank, folder, *local_paths(options.base_model)))
    config = HTDConfig.load(folder)
    options.mpp = options.mpp or config.mpp
    if options.mpp is None:
        raise UserError(f"{options.model}: the model records no mpp; pass --mpp")
    options.map_mpp = options.map_mpp or options.mpp * (ANNOTATED_MAP_CELL if options.annotation else 1)
    options.tile = options.tile or config.resolution
    options.overlap = options.tile // 4 if options.overlap is None else options.overlap
    if options.annotation is not None:
        grid = annotated_slide_grid(options, config.classes)
    else:
        grid = read_map_grid(options.map, config.num_classes)
        check_map_centroids(options.map, config.class_fingerprint)
    slide_map = SlideMap(grid, map_scale(options.map_mpp, options.mpp, options.map))
    if not slide_map.tissue_classes():
        raise UserError(f"--map {options.map}: no tissue (every cell is glass or ignored); nothing to generate")
    fingerprint = options.fingerprint(grid_sha256(grid), model_identity(options.model, folder, options.base_model))
    if already_made(files, fingerprint):
        return json.loads(files.provenance.read_text())
    check_outputs(files, fingerprint, options.overwrite)
    names = names_by_index(config.classes)
    bank = crop_bank_for(config.crop_mode, options.crop_bank)
    if bank is not None:
        check_same_classes(config.class_fingerprint, f"model {options.model}", bank.fingerprint,
                           f"crop bank {bank.folder}")
    crops, crop_records = draw_crops(bank, slide_map.tissue_classes(), names, options.seed)
    pipe = HTDPipeline.for_inference(folder, base_model=options.base_model)
    check_disk(slide_map.shape, pipe.model.vae_scale_factor, pipe.model.unet.config.in_channels, files.work,
               options.map)
    plan = plan_windows(slide_map, options.tile, options.overlap, pipe.model.vae_scale_factor)
    rank = process_share()[0]
    if rank == 0:
        claim_outputs(files, fingerprint)
    barrier()
    denoiser = Denoiser(pipe, plan, slide_map, crops, options, files.work)
    done = denoiser.finished_steps()
    advance = bar("denoising windows", plan.tissue_windows * options.steps) if bar else None
    if advance and done:
        advance(plan.tissue_windows * done)
    latents = denoiser.run(advance)
    if rank != 0:  # the main process decodes and writes
        barrier()
        return json.loads(files.provenance.read_text())
    height, width = slide_map.shape
    rgb = RawArray.create(files.work / "rgb.u8", (height, width, 3), np.uint8)
    decode(pipe, plan, latents, rgb, options, denoiser.glass,
           bar("decoding windows", plan.tissue_windows) if bar else None)
    if options.keep_glass:
        paint_glass_at_mask(rgb, slide_map, denoiser.glass)
    mask = RawArray.create(files.work / "mask.u8", (height, width, 1), np.uint8)
    write_mask_level0(slide_map, mask)
    write_streamed_pyramid(files.image, rgb, options.mpp, files.work, compression=options.compression)
    write_streamed_pyramid(files.mask, mask, options.mpp, files.work, compression="zlib", labels=True)
    write_atomic(files.regions, json.dumps(region_features(slide_map, config.classes)).encode())
    thumbnail(rgb, slide_map, config.classes).save(files.thumbnail)
    provenance = {"toolkit_version": __version__, "options": fingerprint, "size": [width, height],
                  "mpp": options.mpp, "classes": config.classes, "crops": crop_records, "scheduler": "ddim",
                  "windows": {"side": options.tile, "overlap": options.overlap, "all": plan.windows,
                              "denoised": plan.tissue_windows},
                  "predictions_by_process": denoiser.predictions_by_process(),
                  "map": {"sha256": fingerprint["map_sha256"], "size": [grid.shape[1], grid.shape[0]],
                          "mpp": options.map_mpp},
                  "seconds": round(time.perf_counter() - started, 1)}
    write_atomic(files.provenance, json.dumps(provenance, indent=2).encode())
    shutil.rmtree(files.work)
    barrier()
    return provenance
