"""`HTDPipeline`: class maps + crops → images whose masks are the maps.

Called the way diffusers pipelines are:

    >>> import numpy as np, torch
    >>> from htd_toolkit.models.pipeline import HTDPipeline
    >>> pipe = HTDPipeline.from_pretrained("org/htd-camelyon16")  # or a local model folder / checkpoint
    >>> semantic_map = np.zeros((512, 512), np.uint8); semantic_map[:, 256:] = 2; semantic_map[:, :256] = 1
    >>> crops = {1: normal_crop, 2: tumour_crop}  # an RGB uint8 crop per class of the map
    >>> out = pipe(semantic_map=semantic_map, crops=crops, num_inference_steps=25, guidance_scale=2.0,
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("tissue.png"); out.masks[0]  # the mask is the map, exactly

Classifier-free guidance acts on the crops only: the unconditional half keeps the map and drops the
crops (their region masks are zeroed, or the canvas blanked). Both halves therefore give the
ControlNet the same input in the token modes, so its residuals are computed once and shared.
Each sample's starting noise comes from its own seed, so a sample does not depend on its batch.
With `keep_glass=True` the map's background stays glass: at every step its latents are pulled to those of
real glass tiles the model recorded, noised to that step, and its pixels are theirs (`models/background.py`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import BaseOutput

from htd_toolkit.config import keep_compiled_kernels
from htd_toolkit.data.labels import classes_present
from htd_toolkit.models.background import GlassTiles, blend_glass, glass_for, glass_tiles_for, paint_glass
from htd_toolkit.models.conditioning import Conditioning, conditioning_for
from htd_toolkit.models.htd_model import HTDModel

SCHEDULERS = ("unipc", "ddim", "ddpm", "euler")


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    classes = {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler,
               "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(config)


class HTDPipeline:
    def __init__(self, model: HTDModel, scheduler, share_controlnet: bool = True):
        self.model, self.scheduler = model, scheduler
        self.config = model.config
        self.share_controlnet = share_controlnet  # one ControlNet pass for both CFG halves when inputs agree
        self._glass = None  # the model's glass tiles, encoded on first use

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, revision: str | None = None,
                        base_model: str | Path | None = None, torch_dtype: torch.dtype = torch.float32,
                        scheduler: str = "unipc", fuse: bool = True) -> HTDPipeline:
        """Base from `htd_config.json` (or `base_model`), then ControlNet, LoRA and crop adapter from the folder.

        `fuse` merges the LoRA and the attention projections into the weights (`HTDModel.fuse_for_inference`).
        """
        model = HTDModel.from_pretrained(path_or_repo_id, revision=revision, base_model=base_model, dtype=torch_dtype)
        if fuse:
            model.fuse_for_inference()
        return cls(model, make_scheduler(scheduler, model.scheduler_config))

    @classmethod
    def for_inference(cls, path_or_repo_id: str | Path, **kwargs) -> HTDPipeline:
        """`from_pretrained` on this machine's accelerator (bf16 on CUDA, fp32 elsewhere), as the commands run it."""
        from htd_toolkit.config import compute_device

        device = compute_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return cls.from_pretrained(path_or_repo_id, torch_dtype=dtype, **kwargs).to(device)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> HTDPipeline:
        self.model.to(device, dtype) if dtype else self.model.to(device)
        self._glass = None
        if torch.device(device).type == "cuda":  # convolution-heavy: NHWC is the faster layout on GPUs
            for module in (self.model.unet, self.model.controlnet, self.model.vae):
                module.to(memory_format=torch.channels_last)
        return self

    def compile(self, **options) -> HTDPipeline:
        """torch.compile the UNet, the ControlNet and the VAE decoder (the first batch pays the compilation,
        once per machine: the kernels are kept in the htd-toolkit cache)."""
        keep_compiled_kernels()
        self.model.unet = torch.compile(self.model.unet, **options)
        self.model.controlnet = torch.compile(self.model.controlnet, **options)
        self.model.vae.decoder = torch.compile(self.model.vae.decoder, **options)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.prompt_embeds.device

    def conditioning(self, maps: list[np.ndarray], crops: list[dict[int, np.ndarray]]) -> Conditioning:
        """Conditioning for H x W uint8 class maps and, per map, a crop (RGB uint8) for each class present."""
        config = self.config
        items = [conditioning_for(m, c, config.crop_mode, config.max_crops, config.crop_size)
                 for m, c in zip(maps, crops, strict=True)]
        return Conditioning.stack(items)

    @torch.no_grad()
    def __call__(self, semantic_map, crops=None, num_inference_steps: int = 25, guidance_scale: float = 2.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, keep_glass: bool = False):
        """Generate one image per semantic map; the returned masks are the maps themselves.

        Args:
            semantic_map: an (H, W) class-id map (NumPy uint8, torch tensor or PIL image, class 0 background,
                255 ignored), a (B, H, W) batch, or a list of maps. H and W are multiples of the VAE's factor.
            crops: for a crop-conditioned model, per map a dict {class id: RGB uint8 crop (H, W, 3) or PIL
                image} with a crop for every tissue class the map holds (a single dict when there is one map);
                None for a model trained with `--crop_mode none`.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance on the crops (1.0 turns it off); the map is always kept.
            generator: a torch.Generator, or one per map (then each image depends on its own generator only,
                whatever the batch); None draws from torch's global generator.
            output_type: "pil" (a list of PIL images), "np" ((B, H, W, 3) uint8) or "pt" ((B, 3, H, W) float
                in [0, 1]).
            return_dict: an `HTDPipelineOutput` when True, else the tuple (images, masks).
            keep_glass: keep the map's background (class 0) real glass, tiles of the model's glass bank drawn
                from each map's generator (`models/background.py`); off by default, which leaves it to the
                model, which may paint tissue there (docs/fidelity.md §4).

        Returns:
            `HTDPipelineOutput` with `images` and `masks` ((B, H, W) uint8, the maps given).
        """
        maps = as_maps(semantic_map)
        crops = as_crops(crops, len(maps))
        self.check_inputs(maps, crops, num_inference_steps, guidance_scale, generator, output_type)
        cond = self.conditioning(maps, crops)
        latents = self.prepare_latents(len(maps), *maps[0].shape, generator)
        images = self.denoise(cond, latents, num_inference_steps, guidance_scale, keep_glass, generator)
        masks = np.stack(maps)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(image) for image in images]
        elif output_type == "pt":
            images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return HTDPipelineOutput(images=images, masks=masks) if return_dict else (images, masks)

    def check_inputs(self, maps: list[np.ndarray], crops: list[dict], num_inference_steps: int, guidance_scale: float,
                     generator, output_type: str) -> None:
        """One clear ValueError for the first input the model cannot take."""
        f = self.model.vae_scale_factor
        if not maps:
            raise ValueError("semantic_map: give at least one map")
        if len({m.shape for m in maps}) != 1:
            raise ValueError(f"semantic_map: every map must have the same size, got {sorted({m.shape for m in maps})}")
        height, width = maps[0].shape
        if height % f or width % f:
            raise ValueError(f"semantic_map: {width}x{height} is not a multiple of the VAE factor {f}")
        k = self.config.num_classes
        for index, labels in enumerate(maps):
            bad = np.unique(labels[(labels >= k) & (labels != 255)])
            if len(bad):
                raise ValueError(f"semantic_map[{index}]: class id {int(bad[0])} is not one of the model's {k} "
                                 "classes (0 background, 255 ignored)")
        if self.config.crop_mode != "none":
            for index, (labels, given) in enumerate(zip(maps, crops, strict=True)):
                missing = sorted(set(classes_present(labels, self.config.max_crops)) - set(given))
                if missing:
                    raise ValueError(f"crops[{index}]: no crop for class {missing[0]} of its map; this model "
                                     f"({self.config.crop_mode}) needs one per tissue class of the map")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number ≥ 0, got {guidance_scale}")
        if isinstance(generator, list) and len(generator) != len(maps):
            raise ValueError(f"generator: {len(generator)} generators for {len(maps)} maps")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")

    def prepare_latents(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        """Starting noise on the CPU (the same on every device): per map from its own generator when a list
        is given, as diffusers' `randn_tensor` does."""
        f = self.model.vae_scale_factor
        shape = (self.model.unet.config.in_channels, height // f, width // f)
        if isinstance(generator, list):
            return torch.stack([torch.randn(shape, generator=g) for g in generator])
        return torch.randn((batch, *shape), generator=generator)

    @staticmethod
    def seeded(seeds: list[int]) -> list[torch.Generator]:
        """One CPU generator per seed: `generator=pipe.seeded(seeds)` makes each image depend on its seed only."""
        return [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def run(self, cond: Conditioning, seeds: list[int], num_inference_steps: int = 25,
            guidance_scale: float = 2.0, keep_glass: bool = False) -> np.ndarray:
        """(B, H, W, 3) uint8 from collated conditioning, one seed per sample: what `generate`, the recipe's
        validation and the benchmarks call; `pipe(semantic_map=..., crops=..., generator=pipe.seeded(seeds))`
        gives the same pixels."""
        height, width = cond.class_map.shape[-2:]
        generators = self.seeded(seeds)
        latents = self.prepare_latents(len(seeds), height, width, generators)
        return self.denoise(cond, latents, num_inference_steps, guidance_scale, keep_glass, generators)

    @torch.no_grad()
    def denoise(self, cond: Conditioning, latents: torch.Tensor, num_inference_steps: int = 25,
                guidance_scale: float = 2.0, keep_glass: bool = False, generator=None) -> np.ndarray:
        """Images (B, H, W, 3) uint8 from collated conditioning and starting noise (what __call__ runs).

        A scheduler that draws noise at each step (DDPM) draws it from `generator` (one per sample, as for the
        starting noise), diffusers' `prepare_extra_step_kwargs`: the same seed gives the same image."""
        model, device = self.model, self.device
        dtype = model.unet.dtype
        cond = cond.to(device, dtype)
        batch, (height, width) = cond.class_map.shape[0], cond.class_map.shape[-2:]
        f = model.vae_scale_factor
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        start_noise = latents.to(device, dtype)
        latents = start_noise * self.scheduler.init_noise_sigma
        guided = guidance_scale != 1.0 and self.config.crop_mode != "none"
        step_inputs = self._step_inputs(cond, batch, (height // f, width // f), guided)
        glass = glass_for(self.glass_tiles, cond.class_map, generator) if keep_glass else None
        timesteps = self.scheduler.timesteps
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator and generator is not None else {}
        for index, t in enumerate(timesteps):
            noise = self._predict(latents, t, guided, guidance_scale, *step_inputs)
            latents = self.scheduler.step(noise, t, latents, return_dict=False, **step_kwargs)[0]
            if glass is not None:
                following = timesteps[index + 1] if index + 1 < len(timesteps) else None
                latents = blend_glass(latents, glass.weights, glass.latents, start_noise, self.scheduler, following)
        images = model.vae.decode(latents / model.vae.config.scaling_factor, return_dict=False)[0].float()
        if glass is not None:
            images = paint_glass(images, glass)
        return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    @property
    def glass_tiles(self) -> GlassTiles:
        """The model's glass bank for its VAE (`models/background.py`), encoded on first use."""
        if self._glass is None:
            self._glass = glass_tiles_for(self.model)
        return self._glass

    @torch.no_grad()
    def noise_prediction(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                         guidance_scale: float = 2.0) -> torch.Tensor:
        """The guided noise estimate of one step for latents (B, C, h, w) and their conditioning (the windows
        of `generate-slide` are denoised this way, their estimates blended before the scheduler steps)."""
        cond = cond.to(self.device, self.model.unet.dtype)
        guided = guidance_scale != 1.0 and self.config.crop_mode != "none"
        step_inputs = self._step_inputs(cond, latents.shape[0], tuple(latents.shape[-2:]), guided)
        return self._predict(latents.to(self.device, self.model.unet.dtype), t, guided, guidance_scale, *step_inputs)

    def _step_inputs(self, cond: Conditioning, batch: int, latent_size: tuple[int, int], guided: bool):
        """What stays the same at every step: ControlNet input(s) and crop kwargs, CFG halves stacked."""
        model = self.model
        keep = torch.ones(batch, dtype=torch.bool, device=self.device)
        cn_cond = model.controlnet_input(cond, keep_crops=keep)
        # token modes: the ControlNet never sees the crops, so both halves give it the same input
        shared = self.share_controlnet and self.config.crop_mode != "canvas"
        if guided and not shared:
            cn_cond = torch.cat([model.controlnet_input(cond, keep_crops=~keep), cn_cond])
        crop_kwargs = model.crop_kwargs(cond, latent_size, keep)
        if guided and crop_kwargs:
            embeds = crop_kwargs["added_cond_kwargs"]["image_embeds"][0]
            masks = crop_kwargs["cross_attention_kwargs"]["ip_adapter_masks"][0]
            crop_kwargs = {"added_cond_kwargs": {"image_embeds": [torch.cat([embeds, embeds])]},
                           "cross_attention_kwargs": {"ip_adapter_masks": [torch.cat([masks * 0, masks])]}}
        return cn_cond, shared, crop_kwargs

    def _predict(self, latents, t, guided: bool, guidance_scale: float, cn_cond, shared: bool, crop_kwargs):
        model = self.model
        x = self.scheduler.scale_model_input(latents, t)
        timesteps = t.expand(x.shape[0])
        if not guided:
            return model.denoise(x, timesteps, model.controlnet_residuals(x, timesteps, cn_cond), crop_kwargs)
        if shared:
            down, mid = model.controlnet_residuals(x, timesteps, cn_cond)
            residuals = ([torch.cat([r, r]) for r in down], torch.cat([mid, mid]))
        else:
            residuals = model.controlnet_residuals(torch.cat([x, x]), t.expand(2 * x.shape[0]), cn_cond)
        uncond, cond = model.denoise(torch.cat([x, x]), t.expand(2 * x.shape[0]), residuals, crop_kwargs).chunk(2)
        return uncond + guidance_scale * (cond - uncond)


@dataclass
class HTDPipelineOutput(BaseOutput):
    """`images`: PIL images, a (B, H, W, 3) uint8 array or a (B, 3, H, W) tensor; `masks`: (B, H, W) uint8,
    the semantic maps the images were made for (exact by construction)."""

    images: list | np.ndarray | torch.Tensor
    masks: np.ndarray


def as_maps(semantic_map) -> list[np.ndarray]:
    """A map, a batch or a list of maps (NumPy, torch or PIL) → a list of (H, W) uint8 arrays."""
    if isinstance(semantic_map, (list, tuple)):
        return [m for item in semantic_map for m in as_maps(item)]
    array = semantic_map.detach().cpu().numpy() if torch.is_tensor(semantic_map) else np.asarray(semantic_map)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"semantic_map: expected (H, W) or (B, H, W) class ids, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255 or not np.all(np.equal(np.mod(array, 1), 0))):
        raise ValueError("semantic_map: class ids must be whole numbers from 0 to 255")
    return [np.ascontiguousarray(m, dtype=np.uint8) for m in array]


def as_crops(crops, count: int) -> list[dict[int, np.ndarray]]:
    """None, one dict (one map) or a list of dicts → a list of {class: RGB uint8 array}, one per map."""
    if crops is None:
        return [{} for _ in range(count)]
    crops = [crops] if isinstance(crops, dict) else list(crops)
    if len(crops) != count:
        raise ValueError(f"crops: {len(crops)} crop dicts for {count} maps")
    return [{int(c): np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
             for c, image in item.items()} for item in crops]
