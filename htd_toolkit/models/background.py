"""Background stays glass: blended latent diffusion (Avrahami et al., 2023) on the map's background.

Class 0 is glass. Left to itself, a model trained on real patches paints tissue-like texture into part
of it, so that the image no longer agrees with its mask. At every denoising step the latents where the
map is background are therefore replaced by the latent of real glass, noised to that step with the
sample's own starting noise (as diffusers' inpainting pipeline keeps its known region); on the last step
they become the clean glass latent. The glass colour is measured on the training data's background and
recorded in the model (`HTDConfig.glass_rgb`).

The replacement weight is 1 on latent cells whose pixels are all background and falls to 0 over `edge`
cells towards tissue, so tissue is always the model's own and the boundary is soft; a latent cell that
holds any tissue pixel is left to the model. The pixel outline of the glass therefore follows the mask
to within one latent cell (the VAE factor).

A VAE need not decode glass as glass: the shipped toy base's decoder turns its own encoding of the CC0
slide's real glass (243, 243, 243) pink (244, 208, 225). So after decoding, as Blended Latent Diffusion
restores its known region in pixels, the same weights (each latent cell's over its pixels) blend the
glass colour into the image (`paint_glass`); with Stable Diffusion's VAE, which reconstructs flat glass
within a grey level, this changes little.

`looks_like_glass` is the rule the measurements use, the same for real and generated pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_GLASS_RGB = (242, 242, 242)  # a bright-field scanner's empty glass, for models that record none
GLASS_EDGE = 2  # latent cells over which the replacement weight rises from the tissue's edge
GLASS_MIN_BRIGHTNESS = 200  # mean of R, G, B
GLASS_MAX_SATURATION = 25  # HSV saturation in [0, 255]


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


@torch.no_grad()
def glass_latent(vae, rgb: tuple[int, int, int]) -> torch.Tensor:
    """(C,) the latent of plain glass of colour `rgb` (the encoder's mean, per channel), scaled as the UNet
    sees latents."""
    glass = torch.tensor(rgb, dtype=torch.float32).div(127.5).sub(1)[None, :, None, None]
    glass = glass.expand(1, 3, 32, 32).to(vae.device, vae.dtype)
    return vae.encode(glass).latent_dist.mean.float().mean(dim=(0, 2, 3)) * vae.config.scaling_factor


def background_cells(class_map: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, H, W) class ids → (B, 1, H/f, W/f) float: 1 where every pixel of the latent cell is background."""
    background = (class_map == 0).float()[:, None]
    return -F.max_pool2d(-background, factor)


def glass_weights(cells: torch.Tensor, edge: int = GLASS_EDGE) -> torch.Tensor:
    """Replacement weights from `background_cells`: 1 at least `edge` cells from any other cell, k / edge at
    k cells; a cell holding tissue is 0. Cells beyond the array count as background."""
    tissue = 1.0 - cells
    weight = torch.zeros_like(cells)
    for _ in range(max(1, edge)):
        weight += 1.0 - tissue
        tissue = F.max_pool2d(tissue, 3, stride=1, padding=1)
    return weight / max(1, edge)


def paint_glass(images: torch.Tensor, weights: torch.Tensor, rgb: tuple[int, int, int], factor: int) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [-1, 1] with the glass colour blended in by latent-cell `weights`
    (B, 1, h, w; h * factor >= H), each cell's weight over all its `factor` x `factor` pixels."""
    pixels = F.interpolate(weights.to(images.dtype), scale_factor=factor, mode="nearest")
    pixels = pixels[..., :images.shape[-2], :images.shape[-1]]
    glass = torch.tensor(rgb, dtype=images.dtype, device=images.device).div(127.5).sub(1)[None, :, None, None]
    return pixels * glass + (1 - pixels) * images


def blend_glass(latents: torch.Tensor, weights: torch.Tensor, glass: torch.Tensor, start_noise: torch.Tensor,
                scheduler, next_timestep: torch.Tensor | None) -> torch.Tensor:
    """`latents` (after a scheduler step) with the glass latent, noised to `next_timestep` by `start_noise`
    (clean when None: the last step), where `weights` say."""
    clean = glass.to(latents.dtype)[None, :, None, None].expand_as(latents)
    known = clean if next_timestep is None else scheduler.add_noise(clean, start_noise.to(latents.dtype),
                                                                    next_timestep.reshape(1))
    weights = weights.to(latents.dtype)
    return weights * known + (1 - weights) * latents
