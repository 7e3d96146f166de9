"""Patch encoders for clustering, Fréchet distances and the memorization audit, by name.

`get_encoder("uni")`, `get_encoder("uni:/path/to/pytorch_model.bin")`, `get_encoder("stain-stats")`.
An encoder maps uint8 RGB images (N, H, W, 3) to float32 features (N, dim), with its own transform.
Pathology foundation models load from the Hub (`hf-hub:` ids, gated ones need an accepted licence and
a token) or from a local checkpoint; `stain-stats` needs no weights at all (stain and texture
statistics) and serves the tests and the demo. Loading recipes follow TRIDENT's
(docs/formats.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from htd_toolkit.config import compute_device
from htd_toolkit.errors import UserError, one_line
from htd_toolkit.models.weights import loading

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"


@dataclass
class Encoder:
    """A frozen feature extractor with its preprocessing."""

    name: str
    dim: int
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # (N, 3, S, S) normalised → (N, dim)
    input_size: int = 224
    mean_std: tuple = IMAGENET
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    numpy_fn: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)  # weight-free encoders

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3) → float32 (N, dim)."""
        if self.numpy_fn is not None:
            return self.numpy_fn(images).astype(np.float32)
        out = []
        mean = torch.tensor(self.mean_std[0], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.mean_std[1], device=self.device).view(1, 3, 1, 1)
        for start in range(0, len(images), batch_size):
            # uint8 crosses to the device (a quarter of the bytes of float) and is resized there
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(self.device)
            x = F.interpolate(x.permute(0, 3, 1, 2).float() / 255.0, size=(self.input_size, self.input_size),
                              mode="bicubic", antialias=True, align_corners=False)
            out.append(self.forward(((x - mean) / std).to(self.dtype)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)


# --- weight-free ---------------------------------------------------------------------------------

def stain_stats(images: np.ndarray) -> np.ndarray:
    """Per image: percentiles of RGB, HSV and haematoxylin/eosin/DAB optical densities, and texture
    (gradient-magnitude histogram, haematoxylin granularity at two scales). 55 features."""
    from scipy import ndimage
    from skimage import color

    feats = []
    for image in images:
        rgb = image.astype(np.float32) / 255.0
        hed = color.rgb2hed(rgb)
        hsv = color.rgb2hsv(rgb)
        channels = np.concatenate([rgb, hsv, hed], axis=2).reshape(-1, 9)
        stats = [channels.mean(0), channels.std(0), *np.percentile(channels, [10, 50, 90], axis=0)]
        grey = rgb.mean(axis=2)
        gradient = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
        hist = np.histogram(gradient, bins=8, range=(0, 2.0))[0] / gradient.size
        h = hed[..., 0]
        granularity = [np.abs(h - ndimage.uniform_filter(h, size)).mean() for size in (3, 9)]
        feats.append(np.concatenate([*stats, hist, granularity]))
    return np.stack(feats) if feats else np.zeros((0, 55), np.float32)


# --- loaders -----------------------------------------------------------------------------------------

def _device() -> tuple[str, torch.dtype]:
    device = compute_device()
    return str(device), torch.bfloat16 if device.type == "cuda" else torch.float32


def _gated_help(name: str, repo: str) -> str:
    return (f"encoder {name!r}: weights of {repo} are not available here. Request access on "
            f"https://huggingface.co/{repo}, log in (HF_TOKEN or `hf auth login`), or download the checkpoint "
            f"and pass {name}:/path/to/checkpoint")


def _load_state_dict(path: str) -> dict:
    """A checkpoint's tensors from safetensors or a weights-only torch file; a pickle that would build anything
    but tensors is refused without running it, and a damaged file is one line."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                                 weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"checkpoint {path}: a pickle holding more than tensors; refused, never unpickled (save a "
                        "state dict with torch.save, or safetensors)") from err
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"checkpoint {path}: not a readable state dict ({one_line(err)})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path}: holds a {type(state).__name__}, not a state dict")
    return state


def timm_encoder(name: str, repo: str, dim: int, mean_std=IMAGENET, **kwargs):
    def load(checkpoint: str | None) -> Encoder:
        import timm

        try:
            if checkpoint:
                model = timm.create_model(kwargs.pop("arch", f"hf-hub:{repo}"), pretrained=False, num_classes=0,
                                          **{k: v for k, v in kwargs.items() if k != "arch"})
                model.load_state_dict(_load_state_dict(checkpoint), strict=False)
            else:
                model = timm.create_model(f"hf-hub:{repo}", pretrained=True, num_classes=0,
                                          **{k: v for k, v in kwargs.items() if k != "arch"})
        except UserError:
            raise
        except Exception as err:
            raise UserError(_gated_help(name, repo)) from err
        return _wrap(name, model, dim, mean_std)

    return load


def _wrap(name: str, model: torch.nn.Module, dim: int, mean_std, forward=None, input_size: int = 224) -> Encoder:
    device, dtype = _device()
    model = model.eval().to(device, dtype)
    return Encoder(name, dim, forward or model, input_size, mean_std, device, dtype)


def generic_timm(checkpoint: str | None) -> Encoder:
    """`timm:ARCH` (random init, seeded, for tests) or `timm:ARCH:CHECKPOINT` with a local state dict."""
    import timm

    if not checkpoint:
        raise UserError("encoder 'timm' needs an architecture: timm:ARCH[:CHECKPOINT]")
    arch, _, path = checkpoint.partition(":")
    try:
        with torch.random.fork_rng(devices=[]):  # random init: the same weights in every call and process, so
            torch.manual_seed(0)  # FDs measured in different calls compare
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as err:
        raise UserError(f"encoder 'timm': unknown architecture {arch!r}") from err
    if path:
        state = _load_state_dict(path)
        with loading(Path(path)):
            model.load_state_dict(state, strict=False)
    return _wrap(f"timm:{arch}", model, model.num_features, IMAGENET)


def inception(checkpoint: str | None) -> Encoder:
    """Inception-v3 pool features (2048), the classic FID space; needs the torchvision weights file."""
    from torchvision.models import inception_v3

    candidates = [checkpoint] if checkpoint else [
        str(Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name)]
    path = next((c for c in candidates if c and Path(c).exists()), None)
    if path is None:
        raise UserError(f"encoder 'inception' needs the weights file {Path(INCEPTION_URL).name}: download "
                        f"{INCEPTION_URL} into {Path(torch.hub.get_dir()) / 'checkpoints'} or pass "
                        "inception:/path/to/inception_v3_google-0cc3c7bd.pth")
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    state = _load_state_dict(path)
    with loading(Path(path)):
        model.load_state_dict(state)
    model.fc = torch.nn.Identity()
    return _wrap("inception", model, 2048, IMAGENET, input_size=299)


def open_clip_encoder(name: str, hub_id: str, dim: int):
    def load(checkpoint: str | None) -> Encoder:
        import open_clip

        try:
            if checkpoint:
                model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=checkpoint)
            else:
                model, _, _ = open_clip.create_model_and_transforms(f"hf-hub:{hub_id}")
        except Exception as err:
            raise UserError(_gated_help(name, hub_id)) from err
        return _wrap(name, model, dim, CLIP, forward=lambda x: model.encode_image(x))

    return load


def conch(checkpoint: str | None) -> Encoder:
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as err:
        raise UserError("encoder 'conch' needs the CONCH package: pip install git+https://github.com/Mahmoodlab/CONCH"
                        ) from err
    try:
        model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=checkpoint or "hf_hub:MahmoodLab/conch")
    except Exception as err:
        raise UserError(_gated_help("conch", "MahmoodLab/conch")) from err
    return _wrap("conch", model, 512, CLIP, input_size=448,
                 forward=lambda x: model.encode_image(x, proj_contrast=False, normalize=False))


def transformers_encoder(name: str, repo: str, dim: int, kind: str):
    def load(checkpoint: str | None) -> Encoder:
        from transformers import AutoModel, CLIPModel

        source = checkpoint or repo
        try:
            model = CLIPModel.from_pretrained(source) if kind == "clip" else AutoModel.from_pretrained(source)
        except Exception as err:
            raise UserError(_gated_help(name, repo)) from err
        if kind == "clip":
            return _wrap(name, model, dim, CLIP, forward=lambda x: model.get_image_features(pixel_values=x))
        return _wrap(name, model, dim, IMAGENET, forward=lambda x: model(pixel_values=x).last_hidden_state[:, 0])

    return load


REGISTRY: dict[str, Callable[[str | None], Encoder]] = {
    "stain-stats": lambda checkpoint: Encoder("stain-stats", 55, numpy_fn=stain_stats),
    "inception": inception,
    "uni": timm_encoder("uni", "MahmoodLab/uni", 1024, init_values=1e-5, dynamic_img_size=True,
                        arch="vit_large_patch16_224"),
    "uni2-h": timm_encoder("uni2-h", "MahmoodLab/UNI2-h", 1536, arch="vit_giant_patch14_224", img_size=224,
                           patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=5.33334,
                           num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True),
    "virchow2": timm_encoder("virchow2", "paige-ai/Virchow2", 1280, arch="vit_huge_patch14_224", init_values=1e-5,
                             reg_tokens=4, global_pool="token"),
    "h-optimus-0": timm_encoder("h-optimus-0", "bioptimus/H-optimus-0", 1536, HOPTIMUS, init_values=1e-5,
                                global_pool="token", arch="vit_giant_patch14_reg4_dinov2"),
    "gigapath": timm_encoder("gigapath", "prov-gigapath/prov-gigapath", 1536, arch="vit_giant_patch14_dinov2"),
    "phikon": transformers_encoder("phikon", "owkin/phikon", 768, "vit"),
    "phikon-v2": transformers_encoder("phikon-v2", "owkin/phikon-v2", 1024, "vit"),
    "plip": transformers_encoder("plip", "vinid/plip", 512, "clip"),
    "quiltnet-b-32": open_clip_encoder("quiltnet-b-32", "wisdomik/QuiltNet-B-32", 512),
    "conch": conch,
    "timm": generic_timm,
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"NAME" or "NAME:CHECKPOINT" (the checkpoint may itself contain colons, e.g. timm:ARCH:PATH)."""
    name, _, checkpoint = spec.partition(":")
    return name.strip().lower(), checkpoint or None


def public_spec(spec: str) -> str:
    """The spec as it may be written into published files: a local checkpoint keeps only its file name."""
    name, checkpoint = parse_spec(spec)
    if not checkpoint:
        return name
    if name == "timm":
        arch, _, path = checkpoint.partition(":")
        return f"timm:{arch}" + (f":{Path(path).name}" if path else "")
    return f"{name}:{Path(checkpoint).name}"


def get_encoder(spec: str) -> Encoder:
    name, checkpoint = parse_spec(spec)
    if name not in REGISTRY:
        raise UserError(f"unknown encoder {name!r}: known encoders are {', '.join(sorted(REGISTRY))}")
    if checkpoint and name not in ("timm",) and not Path(os.path.expanduser(checkpoint)).exists():
        raise UserError(f"encoder {name!r}: checkpoint {checkpoint} not found")
    return REGISTRY[name](os.path.expanduser(checkpoint) if checkpoint else None)
