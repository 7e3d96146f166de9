"""`HTDPipeline`: class maps + crops → images whose masks are the maps.

Classifier-free guidance acts on the crops only: the unconditional half keeps the map and drops the
crops (their region masks are zeroed, or the canvas blanked). Both halves therefore give the
ControlNet the same input in the token modes, so its residuals are computed once and shared.
Each sample's starting noise comes from its own seed, so a sample does not depend on its batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from htd_toolkit.config import keep_compiled_kernels
from htd_toolkit.models.conditioning import Conditioning, collate_conditioning, conditioning_for
from htd_toolkit.models.htd import HTDModel

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

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> HTDPipeline:
        self.model.to(device, dtype) if dtype else self.model.to(device)
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
        return collate_conditioning(items)

    @torch.no_grad()
    def __call__(self, cond: Conditioning, seeds: list[int], num_inference_steps: int = 25,
                 guidance_scale: float = 2.0) -> np.ndarray:
        """Images (B, H, W, 3) uint8 for a batch of conditions, one seed per sample."""
        model, device = self.model, self.device
        dtype = model.unet.dtype
        cond = cond.to(device, dtype)
        batch, (height, width) = cond.class_map.shape[0], cond.class_map.shape[-2:]
        f = model.vae_scale_factor
        latents = torch.stack([torch.randn(model.unet.config.in_channels, height // f, width // f,
                                           generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = (latents * self.scheduler.init_noise_sigma).to(device, dtype)
        guided = guidance_scale != 1.0 and self.config.crop_mode != "none"
        step_inputs = self._step_inputs(cond, batch, (height // f, width // f), guided)
        for t in self.scheduler.timesteps:
            noise = self._predict(latents, t, guided, guidance_scale, *step_inputs)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        images = model.vae.decode(latents / model.vae.config.scaling_factor, return_dict=False)[0]
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

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
