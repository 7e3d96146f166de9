"""`HTDConfig` (htd_config.json) and `HTDModel`: build from a Stable Diffusion base, train, save, load.

The model folder (docs/formats.md) is written in formats stock diffusers reads:
`controlnet/` (`ControlNetModel.save_pretrained`), `pytorch_lora_weights.safetensors`
(`save_lora_weights` with PEFT key names, `unet.….lora_A.weight`, and adapter metadata so alpha ≠ rank
round-trips; folders saved with the legacy `.lora.down/.up` names still load), and
`crop_adapter/ip_adapter.safetensors` (IP-Adapter format) + `crop_adapter/crop_encoder/`. Loading
goes through `load_lora_weights` and `load_ip_adapter`, then installs the region-masked processor.
`glass_bank.safetensors` holds tiles of the training slides' glass (`models/background.GlassBank`), what
class 0 is kept; folders made before it have none.
"""

from __future__ import annotations

import json
import math
import reprlib
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from htd_toolkit import __version__
from htd_toolkit.classes import fingerprint_problem, write_id2label
from htd_toolkit.errors import UserError, check_number
from htd_toolkit.models import CROP_MODES
from htd_toolkit.models.background import DEFAULT_GLASS_RGB, GLASS_BANK, GlassBank
from htd_toolkit.models.conditioning import Conditioning, one_hot_map, region_masks
from htd_toolkit.models.crop_adapter import (
    CropEncoder,
    export_ip_state_dict,
    initial_ip_state_dict,
    install_crop_adapter,
    use_region_masked_processors,
)
from htd_toolkit.models.folder import CONFIG_NAME
from htd_toolkit.models.weights import check_weight_file, loading

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
IP_WEIGHTS = "ip_adapter.safetensors"
EMBEDDED_BASE = "base"  # a small local base is copied here so the folder loads on its own
# the integers that size what generation allocates (a max_crops of 1e9 asked for 12 TB), as the recipe bounds them
SIZE_LIMITS = {"resolution": (8, 4096), "crop_size": (16, 1024), "max_crops": (1, 64)}


@dataclass
class HTDConfig:
    base_model: str  # Hub id, or "local:<name>"
    classes: list[dict]  # [{"index", "name", "color"}], index 0 = background
    base_revision: str | None = None
    resolution: int = 512
    mpp: float | None = None
    crop_mode: str = "adapter"
    crop_size: int = 64  # crops are resized to this before the VAE (8 x 8 latents at 64)
    max_crops: int = 4  # crop slots per sample: the largest classes present
    embed_dim: int = 256
    prompt: str = ""
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    crop_dropout: float = 0.1
    map_dropout: float = 0.0
    training_data: str | None = None
    class_fingerprint: dict | None = None  # of the training data (htd_toolkit/classes.py)
    glass_rgb: list[int] | None = None  # the training data's glass; class 0 is kept this colour (models/background.py)
    toolkit_version: str = __version__

    def __post_init__(self):
        if self.crop_mode not in CROP_MODES:
            raise UserError(f"unknown crop_mode {self.crop_mode!r}: choose one of {', '.join(CROP_MODES)}")
        if not isinstance(self.resolution, int) or self.resolution <= 0 or self.resolution % 8:
            raise UserError(f"resolution {self.resolution} is not a positive multiple of 8")
        if not (isinstance(self.classes, list) and len(self.classes) >= 2
                and all(isinstance(c, dict) and c.get("index") == i and isinstance(c.get("name"), str)
                        for i, c in enumerate(self.classes))):
            raise UserError("classes must list {index, name} for indexes 0, 1, ..., K-1 (K >= 2)")
        for name, (low, high) in SIZE_LIMITS.items():
            check_number(name, getattr(self, name), low, high, whole=True)
        if self.crop_size % 8 or self.crop_size < 16:
            raise UserError(f"crop_size {self.crop_size} must be a multiple of 8, at least 16")
        if self.class_fingerprint is not None and (problem := fingerprint_problem(self.class_fingerprint, self.classes)):
            raise UserError(problem)
        if self.glass_rgb is not None and not (isinstance(self.glass_rgb, list) and len(self.glass_rgb) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in self.glass_rgb)):
            raise UserError(f"glass_rgb {reprlib.repr(self.glass_rgb)} is not three integers from 0 to 255")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def glass(self) -> tuple[int, int, int]:
        """The colour class 0 is kept: the training data's glass, or a scanner's typical one for older models."""
        return tuple(self.glass_rgb) if self.glass_rgb else DEFAULT_GLASS_RGB

    @property
    def uses_crop_tokens(self) -> bool:
        return self.crop_mode in ("adapter", "embedding")

    @property
    def conditioning_channels(self) -> int:
        return self.num_classes + (3 if self.crop_mode == "canvas" else 0)

    def save(self, folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> HTDConfig:
        path = folder / CONFIG_NAME
        if not path.exists():
            raise UserError(f"{folder}: not an HTD model folder (no {CONFIG_NAME})")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"{path}: not a valid HTD model config ({err})") from err
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data, source) -> HTDConfig:
        """The config in `data` (htd_config.json's, or a saved pipeline's `htd_config`); unknown keys are ignored,
        anything else wrong is one line naming `source`."""
        known = {f.name for f in fields(cls)}
        try:
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError, UserError) as err:  # the folder may come from anyone's Hub repo
            raise UserError(f"{source}: not a valid HTD model config ({err})") from err


def resolve_base(config: HTDConfig, folder: Path | None = None, override: str | Path | None = None) -> str | Path:
    """Where to load the base from: an explicit override, the embedded copy, or the Hub id."""
    if override is not None:
        return override
    if folder is not None and (folder / EMBEDDED_BASE / "model_index.json").exists():
        return folder / EMBEDDED_BASE
    from htd_toolkit.base.shipped import SHIPPED_BASE_ID, shipped_base

    if config.base_model == SHIPPED_BASE_ID:
        return shipped_base()
    if config.base_model.startswith("local:"):
        raise UserError(f"the model was trained on a local base ({config.base_model}) that is not embedded in "
                        "the folder: pass base_model=PATH (or --base-model PATH)")
    return config.base_model


def load_base(base: str | Path, revision: str | None = None, dtype=torch.float32, cache_dir: str | None = None,
              variant: str | None = None) -> dict:
    """tokenizer, text_encoder, vae, unet and scheduler of a diffusers-format SD base (folder or Hub id);
    `cache_dir` and `variant` (the weight files' variant, e.g. fp16) as diffusers' from_pretrained."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = {"revision": revision} if revision else {}
    kwargs.update({"cache_dir": cache_dir} if cache_dir else {})
    weights = {"torch_dtype": dtype, **kwargs, **({"variant": variant} if variant else {})}
    try:
        return {
            "tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **weights),
            "vae": AutoencoderKL.from_pretrained(base, subfolder="vae", **weights),
            "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights),
            "scheduler": DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kwargs),
        }
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{base}: base model not found or incomplete ({first})") from err


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float()


class HTDModel(nn.Module):
    """UNet (frozen, LoRA) + ControlNet on the one-hot map + crop adapter, over a frozen VAE."""

    def __init__(self, config: HTDConfig, unet, controlnet, vae, prompt_embeds: torch.Tensor,
                 crop_encoder: CropEncoder | None = None, scheduler_config: dict | None = None):
        super().__init__()
        self.config, self.scheduler_config = config, scheduler_config
        self.unet, self.controlnet, self.vae, self.crop_encoder = unet, controlnet, vae, crop_encoder
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.vae.requires_grad_(False)
        self.glass_bank: GlassBank | None = None  # the training slides' glass; None: a folder made before it

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_base(cls, config: HTDConfig, base: str | Path, seed: int = 0, cache_dir: str | None = None,
                  variant: str | None = None) -> HTDModel:
        """A fresh model for training on a diffusers-format base (local folder or Hub id)."""
        parts = load_base(base, config.base_revision, cache_dir=cache_dir, variant=variant)
        prompt = encode_prompt(parts["tokenizer"], parts["text_encoder"], config.prompt)
        return cls.from_components(config, parts["unet"], parts["vae"], prompt, parts["scheduler"].config, seed)

    @classmethod
    def from_components(cls, config: HTDConfig, unet, vae, prompt_embeds: torch.Tensor, scheduler_config,
                        seed: int = 0) -> HTDModel:
        """LoRA on `unet`, a ControlNet copied from it, a new crop adapter; only those train."""
        from diffusers import ControlNetModel
        from peft import LoraConfig

        unet.requires_grad_(False)
        torch.manual_seed(seed)
        scale = vae_scale_factor(vae)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=config.conditioning_channels,
                                               conditioning_embedding_out_channels=_embedding_channels(unet, scale))
        crop_encoder = None
        if config.uses_crop_tokens:
            install_crop_adapter(unet, initial_ip_state_dict(unet, config.embed_dim))
            crop_encoder = CropEncoder(mode=config.crop_mode, latent_channels=vae.config.latent_channels,
                                       crop_size=config.crop_size, embed_dim=config.embed_dim,
                                       vae_scale_factor=scale)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=list(config.lora_targets)))
        model = cls(config, unet, controlnet, vae, prompt_embeds, crop_encoder, scheduler_config)
        model.set_trainable()
        return model

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, revision: str | None = None,
                        base_model: str | Path | None = None, dtype=torch.float32) -> HTDModel:
        """Load a model folder (local or Hub) through the stock diffusers loaders."""
        parts = load_model_parts(model_folder(path_or_repo_id, revision), base_model, dtype)
        prompt = encode_prompt(parts["tokenizer"], parts["text_encoder"], parts["config"].prompt)
        model = cls(parts["config"], parts["unet"], parts["controlnet"], parts["vae"], prompt, parts["crop_encoder"],
                    parts["scheduler"].config)
        model.glass_bank = parts["glass_bank"]
        model.requires_grad_(False)
        return model.eval()

    def set_trainable(self) -> None:
        """ControlNet, LoRA, crop projection, to_k_ip/to_v_ip and the crop encoder train; the rest is frozen."""
        self.requires_grad_(False)
        self.controlnet.requires_grad_(True)
        if self.crop_encoder is not None:
            self.crop_encoder.requires_grad_(True)
        for name, param in self.unet.named_parameters():
            if "lora_" in name or "to_k_ip" in name or "to_v_ip" in name or name.startswith("encoder_hid_proj."):
                param.requires_grad_(True)

    @torch.no_grad()
    def fuse_for_inference(self) -> HTDModel:
        """Merge the LoRA into the UNet weights and fuse q/k/v projections: fewer, larger matmuls. Not undone.

        Only self-attention is fused in the UNet: its cross-attention runs the crop processor, which reads
        to_q / to_k / to_v. The ControlNet has no crop processor and is fused throughout.
        """
        if getattr(self.unet, "peft_config", None):
            self.unet.fuse_lora()
            self.unet.unload_lora()
        _fuse_attention_projections(self.unet, only_self_attention=True)
        _fuse_attention_projections(self.controlnet, only_self_attention=False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    # --- forward -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → scaled VAE latents (posterior mean: deterministic)."""
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, n, 3, S, S) → (B, n, embed_dim)."""
        batch, n = crops.shape[:2]
        latents = self.encode_images(crops.flatten(0, 1))
        param = next(self.crop_encoder.parameters())
        return self.crop_encoder(latents.to(param.dtype)).view(batch, n, -1)

    def controlnet_input(self, cond: Conditioning, keep_map: torch.Tensor | None = None,
                         keep_crops: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.controlnet.dtype
        x = one_hot_map(cond.class_map, self.config.num_classes, dtype)
        if keep_map is not None:
            x = x * keep_map[:, None, None, None].to(dtype)
        if self.config.crop_mode == "canvas":
            canvas = cond.canvas.to(dtype)
            if keep_crops is not None:
                canvas = canvas * keep_crops[:, None, None, None].to(dtype)
            x = torch.cat([x, canvas], dim=1)
        return x

    def crop_kwargs(self, cond: Conditioning, latent_size: tuple[int, int],
                    keep_crops: torch.Tensor | None = None) -> dict:
        """UNet kwargs carrying the crop tokens and their region masks (area-pooled to the latent grid)."""
        if not self.config.uses_crop_tokens:
            return {}
        embeds = self.encode_crops(cond.crops)
        masks = F.adaptive_avg_pool2d(region_masks(cond.class_map, cond.crop_classes, keep_crops), latent_size)
        return {"added_cond_kwargs": {"image_embeds": [embeds.to(self.unet.dtype)]},
                "cross_attention_kwargs": {"ip_adapter_masks": [masks.to(self.unet.dtype)]}}

    def controlnet_residuals(self, noisy: torch.Tensor, timesteps: torch.Tensor, controlnet_cond: torch.Tensor):
        text = self.prompt_embeds.expand(noisy.shape[0], -1, -1).to(self.controlnet.dtype)
        return self.controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=controlnet_cond,
                               return_dict=False)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, residuals, crop_kwargs: dict) -> torch.Tensor:
        down, mid = residuals
        text = self.prompt_embeds.expand(noisy.shape[0], -1, -1).to(self.unet.dtype)
        return self.unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False, **crop_kwargs)[0]

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                keep_map: torch.Tensor | None = None, keep_crops: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction for noisy latents under the map and crops (dropped where keep_* is False)."""
        residuals = self.controlnet_residuals(noisy, timesteps, self.controlnet_input(cond, keep_map, keep_crops))
        return self.denoise(noisy, timesteps, residuals, self.crop_kwargs(cond, noisy.shape[-2:], keep_crops))

    # --- saving --------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, embed_base: str | Path | None = None) -> Path:
        """Write the model folder; `embed_base` copies a (small, local) base into `base/`."""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not getattr(self.unet, "peft_config", None):
            raise UserError("this model was fused for inference (LoRA merged into the UNet): it cannot be saved; "
                            "load it with fuse=False to save it")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.controlnet.save_pretrained(folder / "controlnet")
        # the PEFT key names (`unet.….to_k.lora_A.weight`) current diffusers writes (`save_lora_adapter`, the
        # newer training scripts), not the legacy `.lora.down/.up`; load_lora_weights reads both
        lora = get_peft_model_state_dict(self.unet)
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora, safe_serialization=True,
                                                  weight_name=LORA_WEIGHTS,
                                                  unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict())
        if self.config.uses_crop_tokens:
            (folder / "crop_adapter").mkdir(exist_ok=True)
            save_file(export_ip_state_dict(self.unet), folder / "crop_adapter" / IP_WEIGHTS)
            self.crop_encoder.save_pretrained(folder / "crop_adapter" / "crop_encoder")
        if self.glass_bank is not None:
            self.glass_bank.save(folder / GLASS_BANK)
        if embed_base is not None:
            shutil.copytree(embed_base, folder / EMBEDDED_BASE, dirs_exist_ok=True)
        self.config.save(folder)
        write_id2label(folder, self.config.classes)
        return folder


def vae_scale_factor(vae) -> int:
    """Image pixels per latent cell: 8 for Stable Diffusion, 4 for the H&E base (one downsample per block but the last)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _embedding_channels(unet, scale: int) -> tuple[int, ...]:
    """ControlNet conditioning embedding: diffusers' default, or a small one for small bases; n + 1 entries
    downsample the map by 2**n, which must be the VAE's scale factor."""
    channels = (16, 32, 96, 256) if unet.config.block_out_channels[0] >= 64 else (8, 8, 16, 16)
    return channels[:int(math.log2(scale)) + 1]


def _fuse_attention_projections(model, only_self_attention: bool) -> None:
    """Concatenate q/k/v (self-attention) or k/v (cross-attention) weights and use diffusers' fused processor."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    processors = dict(model.attn_processors)
    for name in processors:
        if only_self_attention and not name.endswith("attn1.processor"):
            continue
        model.get_submodule(name.removesuffix(".processor")).fuse_projections()
        processors[name] = FusedAttnProcessor2_0()
    model.set_attn_processor(processors)


def check_model_files(folder: Path, config: HTDConfig) -> None:
    """Before any loader reads them: every weight file the folder must hold (safetensors of finite floats), and
    a ControlNet that takes the map's channels."""
    from diffusers import ControlNetModel
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    files = [folder / LORA_WEIGHTS, folder / "controlnet" / SAFETENSORS_WEIGHTS_NAME]
    if config.uses_crop_tokens:
        files += [folder / "crop_adapter" / IP_WEIGHTS, folder / "crop_adapter" / "crop_encoder" / SAFETENSORS_WEIGHTS_NAME]
    for path in files:
        check_weight_file(path)
    controlnet_config = folder / "controlnet" / ControlNetModel.config_name
    with loading(controlnet_config):
        channels = ControlNetModel.load_config(controlnet_config.parent).get("conditioning_channels")
    if channels != config.conditioning_channels:
        canvas = " and the crop canvas's 3" if config.crop_mode == "canvas" else ""
        raise UserError(f"{controlnet_config}: conditioning_channels {channels}, but the map's {config.num_classes} "
                        f"classes{canvas} need {config.conditioning_channels}")


def load_model_parts(folder: Path, base_model: str | Path | None = None, dtype=torch.float32) -> dict:
    """A model folder's parts, with stock diffusers loaders: its `config` (HTDConfig), the base's tokenizer,
    text_encoder, vae and scheduler, the base UNet with the LoRA (`load_lora_weights`) and the crop adapter
    (`load_ip_adapter`, region-masked processor) loaded, the ControlNet, the crop encoder (None without crop
    tokens) and the glass bank (None in a folder made before banks)."""
    from diffusers import ControlNetModel, StableDiffusionPipeline

    config = HTDConfig.load(folder)
    check_model_files(folder, config)
    base = resolve_base(config, folder, base_model)
    parts = load_base(base, config.base_revision if base == config.base_model else None, dtype)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    with loading(folder / LORA_WEIGHTS):
        pipe.load_lora_weights(folder, weight_name=LORA_WEIGHTS)
    crop_encoder = None
    if config.uses_crop_tokens:
        with loading(folder / "crop_adapter" / IP_WEIGHTS):
            pipe.load_ip_adapter(str(folder), subfolder="crop_adapter", weight_name=IP_WEIGHTS,
                                 image_encoder_folder=None)
        use_region_masked_processors(pipe.unet)
        with loading(folder / "crop_adapter" / "crop_encoder"):
            crop_encoder = CropEncoder.from_pretrained(folder / "crop_adapter" / "crop_encoder", torch_dtype=dtype,
                                                       use_safetensors=True)
    with loading(folder / "controlnet"):
        controlnet = ControlNetModel.from_pretrained(folder / "controlnet", torch_dtype=dtype, use_safetensors=True)
    glass_bank = GlassBank.load(folder / GLASS_BANK) if (folder / GLASS_BANK).exists() else None
    return {**parts, "unet": pipe.unet, "config": config, "controlnet": controlnet, "crop_encoder": crop_encoder,
            "glass_bank": glass_bank}


def model_folder(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder for a model path or Hub repo id (downloaded without `checkpoint-*`)."""
    path = Path(path_or_repo_id)
    if path.exists():
        if not (path / CONFIG_NAME).exists():
            raise UserError(f"{path}: not an HTD model folder (no {CONFIG_NAME})")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from htd_toolkit.downloads import checked_revision

    try:
        commit = checked_revision(str(path_or_repo_id), "model", revision)  # every path plain, then that commit
        local = Path(snapshot_download(str(path_or_repo_id), revision=commit, ignore_patterns=["checkpoint-*"]))
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise UserError(f"{path_or_repo_id}: model not found locally or on the Hub ({type(err).__name__})") from err
    if not (local / CONFIG_NAME).exists():
        raise UserError(f"{path_or_repo_id}: not an HTD model repo (no {CONFIG_NAME})")
    return local
