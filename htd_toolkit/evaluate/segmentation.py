"""Downstream segmentation: DeepLabv3+ (segmentation-models-pytorch) trained on synthetic, real and
real + synthetic data, scored on a held-out real test split.

IoU of class c = TP / (TP + FP + FN), pixels counted over the whole test split, ignore (255) pixels
left out; mIoU = the mean over the classes present in the test ground truth (background included).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from htd_toolkit.classes import IGNORE
from htd_toolkit.config import compute_device
from htd_toolkit.errors import UserError

IOU_DEFINITION = ("IoU_c = TP/(TP+FP+FN) over all pixels of the real test split (255 ignored); "
                  "mIoU = mean over classes present in the test ground truth, background included")


def build_model(num_classes: int, encoder: str = "resnet34"):
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:
        raise UserError("segmentation needs the eval extra: pip install 'htd-toolkit[eval]'") from err
    return smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=num_classes)


def _batch(images: np.ndarray, masks: np.ndarray, index, size: int, device: torch.device):
    """One batch as float images in [-1, 1] and class masks, resized to `size` on the device.

    The sets stay uint8 in host memory until a batch needs them: 10,000 images at 512 px are 7.9 GB
    as uint8 and would be 31 GB as float.
    """
    x = torch.from_numpy(images[index]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(masks[index].astype(np.int64)).to(device)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        y = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return x.contiguous(memory_format=torch.channels_last), y


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (about twice the convolution throughput); full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_segmenter(images: np.ndarray, masks: np.ndarray, num_classes: int, epochs: int, size: int = 256,
                    batch_size: int = 8, encoder: str = "resnet34", seed: int = 0, lr: float = 1e-3,
                    on_epoch=None):
    """DeepLabv3+ from random init; `on_epoch()` is called after each epoch (a progress bar)."""
    torch.manual_seed(seed)
    device = compute_device()
    model = build_model(num_classes, encoder).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).numpy()
        for start in range(0, len(images), batch_size):
            index = np.sort(order[start:start + batch_size])
            if len(index) < 2:  # batch norm needs two samples
                continue
            xb, yb = _batch(images, masks, index, size, device)
            if torch.rand(1, generator=generator) < 0.5:
                xb, yb = xb.flip(-1), yb.flip(-1)
            with _autocast(device):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if on_epoch:
            on_epoch()
    return model.eval()


@torch.no_grad()
def score(model, images: np.ndarray, masks: np.ndarray, classes: list[str], size: int = 256) -> dict:
    device = next(model.parameters()).device
    k = len(classes)
    confusion = torch.zeros(k, k, dtype=torch.long)
    for start in range(0, len(images), 16):
        x, truth = _batch(images, masks, slice(start, start + 16), size, device)
        with _autocast(device):
            prediction = model(x).argmax(1)
        valid = truth != IGNORE
        confusion += torch.bincount(truth[valid] * k + prediction[valid], minlength=k * k).view(k, k).cpu()
    return iou_from_confusion(confusion.numpy(), classes)


def iou_from_confusion(confusion: np.ndarray, classes: list[str]) -> dict:
    tp = np.diag(confusion).astype(float)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    present = confusion.sum(1) > 0
    iou = np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), 0.0)
    return {"miou": float(iou[present].mean()) if present.any() else 0.0,
            "per_class": {name: round(float(iou[i]), 4) for i, name in enumerate(classes) if present[i]}}


def majority_baseline(train_masks: np.ndarray, test_masks: np.ndarray, classes: list[str]) -> dict:
    """The score of predicting the training set's most frequent class everywhere."""
    counts = np.bincount(train_masks[train_masks != IGNORE].ravel(), minlength=len(classes))
    k = len(classes)
    truth = test_masks[test_masks != IGNORE].ravel()
    confusion = np.bincount(truth * k + int(counts.argmax()), minlength=k * k).reshape(k, k)
    return iou_from_confusion(confusion, classes)
