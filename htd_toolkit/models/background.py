"""Background stays glass: the map's background is pasted with real glass after decoding.

Class 0 is glass. Left to itself, a model trained on real patches paints tissue-like texture into part
of it, so that the image no longer agrees with its mask. Painting it one flat colour is no fix: a
segmenter trained on such pairs learns that background is that colour, and finds none on real slides
(docs/fidelity.md §4). So the model records real glass: a bank of tiles of its training slides'
background (`GlassBank`: the map's background cells that are glass throughout, dust, noise and faint
stain included), saved as `glass_bank.safetensors` in the model folder.

Each sample's background gets a canvas of bank tiles, a tile and one of its four flips per cell, drawn
from the sample's own generator after the denoising steps. After decoding, every background pixel of the
map, at full resolution, is the canvas's (`paint_glass`): the tissue's edge is the mask's outline and the
tissue is the model's own, pixel for pixel what it is without the glass. Pulling the background's
latents towards the glass at every step as well (blended latent diffusion) was measured and dropped: it
made the model paint pale fringe on the tissue side of the edge, which the glass rule counts as glass in
tissue (docs/fidelity.md §4).

A model folder without a bank (made before it) falls back to a bank of one flat tile of its recorded
glass colour (`HTDConfig.glass_rgb`), with a warning.

`looks_like_glass` is the rule the measurements use, the same for real and generated pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from htd_toolkit.errors import UserError, one_line

logger = logging.getLogger(__name__)
DEFAULT_GLASS_RGB = (242, 242, 242)  # a bright-field scanner's empty glass, for models that record none
GLASS_BANK = "glass_bank.safetensors"
GLASS_TILE = 16  # px side of a bank tile: a 16-µm map cell at 1 µm/px, a multiple of the VAE factors (4, 8)
GLASS_BANK_SIZE = 256  # tiles recorded at most (768 bytes each at 16 px)
GLASS_TILE_MIN_SHARE = 0.95  # of a bank tile's pixels that look like glass: room for dust, none for tissue fringe
GLASS_MIN_BRIGHTNESS = 200  # mean of R, G, B
GLASS_MAX_SATURATION = 25  # HSV saturation in [0, 255]
FLIPS = 4  # each tile as it is, flipped left-right, upside down, and both


def looks_like_glass(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 → bool: bright and unstained (the rule every glass fraction here is measured with)."""
    from htd_toolkit.wsi.tissue import saturation

    bright = rgb.astype(np.float32).mean(-1) >= GLASS_MIN_BRIGHTNESS
    return bright & (saturation(rgb) <= GLASS_MAX_SATURATION)


def glass_shares(images: np.ndarray, masks: np.ndarray, edge: int = 4) -> tuple[float, float, float]:
    """(share of background pixels that look like glass, share of tissue pixels that do, the same for tissue
    more than `edge` pixels from anything else) in (N, H, W, 3) images and their (N, H, W) masks."""
    from scipy.ndimage import binary_erosion

    glass = looks_like_glass(images)
    tissue = (masks > 0) & (masks != 255)
    inner = np.stack([binary_erosion(t, iterations=edge, border_value=1) for t in tissue.reshape(-1, *masks.shape[-2:])])
    inner = inner.reshape(tissue.shape)
    return float(glass[masks == 0].mean()), float(glass[tissue].mean()), float(glass[inner].mean())


def glass_colour(images: np.ndarray, masks: np.ndarray, limit: int = 2_000_000) -> tuple[int, int, int] | None:
    """The median colour of the background pixels (class 0) that look like glass in (N, H, W, 3) images and
    their (N, H, W) masks; None when there are none. At most `limit` pixels are looked at."""
    picked = []
    for image, mask in zip(images, masks, strict=True):
        pixels = image[mask == 0]
        picked.append(pixels[looks_like_glass(pixels)])
        if sum(len(p) for p in picked) >= limit:
            break
    pixels = np.concatenate(picked) if picked else np.zeros((0, 3), np.uint8)
    if not len(pixels):
        return None
    return tuple(int(v) for v in np.median(pixels, axis=0).round())


def square_cells(array: np.ndarray, side: int) -> np.ndarray:
    """(N, H, W, ...) → (N, H/side, W/side, side, side, ...): the squares of each image on a grid from its corner."""
    n, height, width = array.shape[:3]
    rows, columns = height // side, width // side
    grid = array[:, :rows * side, :columns * side].reshape(n, rows, side, columns, side, *array.shape[3:])
    return grid.swapaxes(2, 3)


@dataclass
class GlassBank:
    """Tiles of real glass, (K, S, S, 3) uint8; `recorded` is False for the flat fallback of an older model."""

    tiles: torch.Tensor
    recorded: bool = True

    @classmethod
    def from_images(cls, images: np.ndarray, masks: np.ndarray, side: int = GLASS_TILE,
                    size: int = GLASS_BANK_SIZE) -> GlassBank | None:
        """The `side`-px squares of (N, H, W, 3) training images that their (N, H, W) maps call background
        throughout and whose pixels look like glass (`GLASS_TILE_MIN_SHARE` of them): the slides' glass, dust,
        noise and faint stain included. A coarse map's background cell often holds the fringe of the tissue
        beside it; such cells are left out, or a canvas of them is a mosaic of shredded tissue that a
        segmenter learns as background. At most `size`, evenly spread over the candidates; None when there
        are none."""
        background = square_cells(masks == 0, side).all(axis=(3, 4))
        glassy = square_cells(looks_like_glass(images), side).mean(axis=(3, 4)) >= GLASS_TILE_MIN_SHARE
        candidates = square_cells(images, side)[background & glassy]
        if not len(candidates):
            return None
        picked = np.linspace(0, len(candidates) - 1, min(size, len(candidates))).round().astype(int)
        return cls(torch.from_numpy(np.ascontiguousarray(candidates[picked], dtype=np.uint8)))

    @classmethod
    def flat(cls, rgb: tuple[int, int, int], side: int = GLASS_TILE) -> GlassBank:
        """One tile of plain `rgb`: what a model folder without a bank keeps class 0."""
        return cls(torch.tensor(rgb, dtype=torch.uint8).expand(1, side, side, 3).clone(), recorded=False)

    @classmethod
    def load(cls, path: Path) -> GlassBank:
        """The bank a model folder records, checked: one line naming the file otherwise."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tiles = load_file(path).get("tiles")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable safetensors file ({one_line(err)})") from err
        if (tiles is None or tiles.dtype != torch.uint8 or tiles.ndim != 4 or not len(tiles)
                or tiles.shape[1] != tiles.shape[2] or tiles.shape[3] != 3):
            found = "no tensor 'tiles'" if tiles is None else f"'tiles' {str(tiles.dtype).removeprefix('torch.')} " \
                                                              f"{tuple(tiles.shape)}"
            raise UserError(f"{path}: expected a tensor 'tiles' of square RGB uint8 tiles (K, S, S, 3), found {found}")
        return cls(tiles.contiguous())

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"tiles": self.tiles.contiguous()}, path)

    @property
    def side(self) -> int:
        return int(self.tiles.shape[1])


def with_flips(tiles: torch.Tensor) -> torch.Tensor:
    """(K, C, s, s) → (K * FLIPS, C, s, s): tile k flipped as code k * FLIPS + f says."""
    flipped = torch.stack([tiles, tiles.flip(-1), tiles.flip(-2), tiles.flip(-2, -1)], dim=1)
    return flipped.flatten(0, 1)


def assemble(variants: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cells (V, C, s, s) laid out as integer `codes` (..., R, Q) say → (..., C, R * s, Q * s)."""
    cells = variants[codes]  # (..., R, Q, C, s, s)
    *lead, rows, columns, channels, side, _ = cells.shape
    return cells.movedim(-3, -5).transpose(-3, -2).reshape(*lead, channels, rows * side, columns * side)


class GlassTiles:
    """A bank's tiles for one VAE: pixels (uint8) and scaled latents (what generate-slide's decoder sees where
    no window was denoised), each in its four flips."""

    def __init__(self, bank: GlassBank, vae, factor: int):
        if bank.side % factor:
            raise UserError(f"glass bank: tiles of {bank.side} px are not a whole number of the VAE's {factor}-px "
                            "latent cells")
        self.side, self.factor, self.vae = bank.side, factor, vae
        self.codes = len(bank.tiles) * FLIPS
        self.pixel_variants = with_flips(bank.tiles.permute(0, 3, 1, 2))

    @cached_property
    def latent_variants(self) -> torch.Tensor:
        """The tiles' VAE encodings in their flips, made on first use (patches paste pixels only)."""
        tiles = self.pixel_variants[::FLIPS]
        with torch.no_grad():
            scaled = tiles.to(self.vae.device, self.vae.dtype) / 127.5 - 1
            latents = self.vae.encode(scaled).latent_dist.mean.float() * self.vae.config.scaling_factor
        return with_flips(latents.cpu())

    def draw(self, rows: int, columns: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(rows, columns) codes: a tile and a flip for every cell of a canvas."""
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, self.codes, (rows, columns), generator=generator, device=device).cpu()

    def cells(self, height: int, width: int) -> tuple[int, int]:
        """Canvas cells (rows, columns) that cover `height` x `width` pixels."""
        return -(-height // self.side), -(-width // self.side)

    def pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., R, Q) codes → (..., 3, R * S, Q * S) uint8."""
        return assemble(self.pixel_variants, codes)

    def latents(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., R, Q) codes → (..., C, R * S / f, Q * S / f) float32."""
        return assemble(self.latent_variants, codes)


def glass_tiles_for(model) -> GlassTiles:
    """An `HTDModel`'s glass bank for its VAE; for a folder made before banks, its flat glass colour, with a warning."""
    bank = model.glass_bank
    if bank is None:
        logger.warning("the model records no glass bank (%s): made before htd-toolkit recorded one, or no 16-px "
                       "background cell of its training data is glass throughout (%d %% of pixels by the glass "
                       "rule); its background is kept the flat colour %s, which real glass never is",
                       GLASS_BANK, round(GLASS_TILE_MIN_SHARE * 100), model.config.glass)
        bank = GlassBank.flat(model.config.glass)
    return GlassTiles(bank, model.vae, model.vae_scale_factor)


@dataclass
class Glass:
    """What keeps a batch's background glass: the canvas's `pixels` (B, 3, H, W) uint8 and the map's
    `background` (B, 1, H, W) bool."""

    pixels: torch.Tensor
    background: torch.Tensor


def glass_for(tiles: GlassTiles, class_map: torch.Tensor, generator=None) -> Glass | None:
    """The glass of (B, H, W) class maps: one canvas per map, drawn from its own generator when `generator`
    is a list (one per map), else all from `generator`; None when no pixel is background."""
    background = (class_map == 0)[:, None]
    if not bool(background.any()):
        return None
    batch, (height, width) = class_map.shape[0], class_map.shape[-2:]
    rows, columns = tiles.cells(height, width)
    if isinstance(generator, list):
        codes = torch.stack([tiles.draw(rows, columns, g) for g in generator])
    else:
        codes = tiles.draw(batch * rows, columns, generator).view(batch, rows, columns)
    return Glass(pixels=tiles.pixels(codes)[..., :height, :width].to(class_map.device), background=background)


def paint_glass(images: torch.Tensor, glass: Glass) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [-1, 1] with every background pixel the glass canvas's."""
    pixels = glass.pixels.to(images.device, images.dtype) / 127.5 - 1
    return torch.where(glass.background.to(images.device), pixels, images)
