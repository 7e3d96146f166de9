"""Conditioning tensors built from a class map and one crop per class present.

Crop slots: each sample gets `max_crops` slots, filled with the tissue classes present in its map
(ascending), one crop per class; a slot's region mask is that class's pixels. Unused slots have an
all-zero mask, which removes them from the attention exactly, and a dropped
crop (classifier-free guidance) is a zeroed mask too, so "no crops" is one well-defined input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from htd_toolkit.classes import IGNORE
from htd_toolkit.data.crops import inside_radius


@dataclass
class Conditioning:
    """One batch of conditions. H x W is the image resolution; S the crop side given to the encoder."""

    class_map: torch.Tensor  # (B, H, W) long, class ids (255 = ignore)
    crops: torch.Tensor | None = None  # (B, n, 3, S, S) in [-1, 1]
    crop_classes: torch.Tensor | None = None  # (B, n) long, 0 for an empty slot
    canvas: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], crops pasted into their regions

    def to(self, device, dtype=None) -> Conditioning:
        def move(t, floating=True):
            if t is None:
                return None
            return t.to(device, dtype=dtype) if (floating and dtype is not None) else t.to(device)

        return Conditioning(self.class_map.to(device), move(self.crops), move(self.crop_classes, False),
                            move(self.canvas))

    def repeat(self, times: int) -> Conditioning:
        """Each sample `times` times in a row (diffusers' `num_images_per_prompt`)."""
        if times == 1:
            return self

        def repeated(t):
            return None if t is None else t.repeat_interleave(times, dim=0)

        return Conditioning(repeated(self.class_map), repeated(self.crops), repeated(self.crop_classes),
                            repeated(self.canvas))

    @classmethod
    def stack(cls, items: list[Conditioning]) -> Conditioning:
        """One batch from per-sample conditions (each without the batch dimension)."""
        def stacked(name):
            values = [getattr(item, name) for item in items]
            return None if values[0] is None else torch.stack(values)

        return cls(stacked("class_map"), stacked("crops"), stacked("crop_classes"), stacked("canvas"))


def one_hot_map(class_map: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(B, H, W) class ids → (B, K, H, W) one-hot; the ignore value maps to all zeros."""
    valid = class_map != IGNORE
    index = torch.where(valid, class_map, torch.zeros_like(class_map)).long()
    out = F.one_hot(index, num_classes).permute(0, 3, 1, 2).to(dtype)
    return out * valid[:, None].to(dtype)


def region_masks(class_map: torch.Tensor, crop_classes: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n, H, W) float masks: slot j covers the pixels of class crop_classes[:, j] (0 = empty slot).

    `keep` (B,) bool drops every crop of a sample (its masks become zero).
    """
    masks = (class_map[:, None] == crop_classes[:, :, None, None]) & (crop_classes[:, :, None, None] > 0)
    if keep is not None:
        masks = masks & keep[:, None, None, None]
    return masks.float()


def paste_box(region: np.ndarray) -> tuple[int, int, int] | None:
    """(x, y, side) of the largest square inside `region`, centred where the region is deepest."""
    radius = inside_radius(region)
    if radius.max(initial=0) == 0:
        return None
    row, col = np.unravel_index(int(np.argmax(radius)), radius.shape)
    half = int(radius[row, col]) - 1
    return int(col) - half, int(row) - half, 2 * half + 1


def build_canvas(labels: np.ndarray, crops: dict[int, np.ndarray]) -> np.ndarray:
    """An RGB uint8 canvas (mid-grey elsewhere): each class's crop resized into its region's largest square."""
    canvas = np.full((*labels.shape, 3), 127, np.uint8)
    for cls, crop in crops.items():
        box = paste_box(labels == cls)
        if box is None:
            continue
        x, y, side = box
        tile = torch.as_tensor(np.array(crop, dtype=np.float32)).permute(2, 0, 1)[None]  # crops may be read-only
        tile = F.interpolate(tile, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        canvas[y:y + side, x:x + side] = tile[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return canvas


def to_unit_range(image: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 → float 3 x H x W in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def crop_slots(crops: dict[int, np.ndarray], max_crops: int, crop_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops by class → (max_crops, 3, S, S) in [-1, 1] and (max_crops,) class ids; empty slots are zero."""
    tensors = torch.zeros(max_crops, 3, crop_size, crop_size)
    classes = torch.zeros(max_crops, dtype=torch.long)
    for slot, cls in enumerate(sorted(crops)[:max_crops]):
        tile = to_unit_range(crops[cls])[None]
        tensors[slot] = F.interpolate(tile, size=(crop_size, crop_size), mode="bicubic", antialias=True,
                                      align_corners=False)[0].clamp(-1, 1)
        classes[slot] = cls
    return tensors, classes


def conditioning_for(labels: np.ndarray, crops: dict[int, np.ndarray], crop_mode: str, max_crops: int,
                     crop_size: int) -> Conditioning:
    """The conditions of one map and its crops (no batch dimension), as training and generation use them;
    `Conditioning.stack` makes a batch of them."""
    cond = Conditioning(torch.from_numpy(labels.astype(np.int64)))
    if crop_mode == "none":
        return cond
    cond.crops, cond.crop_classes = crop_slots(crops, max_crops, crop_size)
    if crop_mode == "canvas":
        cond.canvas = to_unit_range(build_canvas(labels, crops))
    return cond
