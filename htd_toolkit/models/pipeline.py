"""`HTDPipeline`: class maps + crops → images whose masks are the maps; a `diffusers.DiffusionPipeline`.

Called the way diffusers pipelines are:

    >>> import numpy as np, torch
    >>> from htd_toolkit.models.pipeline import HTDPipeline
    >>> pipe = HTDPipeline.from_pretrained("org/htd-camelyon16")  # or a local model folder / checkpoint
    >>> semantic_map = np.zeros((512, 512), np.uint8); semantic_map[:, 256:] = 2; semantic_map[:, :256] = 1
    >>> crops = {1: normal_crop, 2: tumour_crop}  # an RGB uint8 crop per class of the map
    >>> out = pipe(semantic_map=semantic_map, crops=crops, num_inference_steps=25, guidance_scale=2.0,
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("tissue.png"); out.masks[0]  # the mask is the map, exactly

Components (`pipe.components`): `vae`, `text_encoder`, `tokenizer`, `unet` (the base UNet with the LoRA, merged
once loaded for inference), `controlnet`, `scheduler` and `crop_adapter` (`CropAdapter`: crop encoder, token
projection and the cross-attention's `to_k_ip` / `to_v_ip`, installed into the UNet); `htd_config` (the model's
`HTDConfig`: classes, crop mode, glass, prompt) is the pipeline's config. `save_pretrained` writes them in the
diffusers layout (`model_index.json` + a folder per component) and the folder loads with
`HTDPipeline.from_pretrained` or `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

Classifier-free guidance acts on the crops only: the unconditional half keeps the map and drops the
crops (their region masks are zeroed, or the canvas blanked). Both halves therefore give the
ControlNet the same input in the token modes, so its residuals are computed once and shared.
Each sample's starting noise comes from its own seed, so a sample does not depend on its batch.
With `keep_glass=True` the map's background stays glass: after decoding its pixels are those of real glass
tiles the model recorded, and the tissue is the model's own (`models/background.py`).
"""

from __future__ import annotations

import inspect
import json
import logging
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass
from numbers import Integral
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from htd_toolkit.classes import write_id2label
from htd_toolkit.config import keep_compiled_kernels
from htd_toolkit.data.labels import classes_present
from htd_toolkit.errors import InputError, UserError
from htd_toolkit.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, check_generation_settings
from htd_toolkit.models.background import (
    GLASS_BANK,
    GlassBank,
    GlassTiles,
    glass_for,
    glass_tiles_for,
    paint_glass,
)
from htd_toolkit.models.conditioning import Conditioning, conditioning_for
from htd_toolkit.models.crop_adapter import CropAdapter
from htd_toolkit.models.htd_model import (
    HTDConfig,
    HTDModel,
    encode_prompt,
    load_model_parts,
    model_folder,
)
from htd_toolkit.models.weights import check_weight_file, loading

logger = logging.getLogger(__name__)
# model_index.json names the class, and the crop adapter's, as [module file, class]: `DiffusionPipeline.from_pretrained`
# imports each from that file of the folder (with trust_remote_code=True; the Hub download needs the files), and each
# file holds only the import of the installed toolkit's class.
PIPELINE_MODULE = "htd_pipeline"
CROP_ADAPTER_MODULE = "htd_crop_adapter"
SHIMS = {
    f"{PIPELINE_MODULE}.py": (PIPELINE_MODULE, "HTDPipeline", "htd_toolkit.models.pipeline"),
    f"crop_adapter/{CROP_ADAPTER_MODULE}.py": (CROP_ADAPTER_MODULE, "CropAdapter", "htd_toolkit.models.crop_adapter"),
}


def shim(path: str) -> str:
    """The text of one of the `SHIMS` files: the import of the toolkit's class."""
    _, name, module = SHIMS[path]
    return (f'"""htd-toolkit\'s {name} (pip install htd-toolkit), for DiffusionPipeline.from_pretrained."""\n\n'
            f"from {module} import {name}  # noqa: F401\n")


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SCHEDULERS = ("unipc", "ddim", "ddpm", "euler")


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    classes = {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler,
               "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(config)


class HTDPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->crop_adapter->controlnet->unet->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder", "tokenizer", "crop_adapter"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, crop_adapter: CropAdapter | None = None,
                 htd_config: dict | None = None):
        super().__init__()
        if crop_adapter is not None:
            crop_adapter.install(unet)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
                              scheduler=scheduler, crop_adapter=crop_adapter)
        config = htd_config if isinstance(htd_config, HTDConfig) else HTDConfig.from_dict(htd_config, "htd_config")
        self.register_to_config(htd_config=asdict(config))
        self.htd_config = config
        # encoded once, where the text encoder is (the CPU after loading): the same embedding on every device
        self.prompt_embeds = (encode_prompt(tokenizer, text_encoder, config.prompt)
                              if text_encoder is not None and tokenizer is not None else None)
        self.share_controlnet = True  # one ControlNet pass for both CFG halves when inputs agree
        self.glass_bank: GlassBank | None = None  # the training slides' glass (`glass_bank.safetensors`)
        self._glass = None  # the glass bank's tiles and latents, encoded on first use
        self._model = None

    # --- loading and saving ----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, revision: str | None = None,
                        base_model: str | Path | None = None, torch_dtype: torch.dtype = torch.float32,
                        scheduler: str | None = None, fuse: bool = True, **kwargs) -> HTDPipeline:
        """A model folder or Hub repo: a saved pipeline (`model_index.json`), or a folder the recipe wrote (a
        `checkpoint-N` too), whose base comes from `htd_config.json` (or `base_model`) and whose ControlNet, LoRA
        and crop adapter are loaded onto it.

        `scheduler` swaps in one of `SCHEDULERS` by name (a recipe folder gets UniPC when none is named; a saved
        pipeline keeps its own). `fuse` merges the LoRA and the attention projections into the weights
        (`HTDModel.fuse_for_inference`). Other keyword arguments go to `DiffusionPipeline.from_pretrained`.
        """
        folder = model_folder(pretrained_model_name_or_path, revision)
        if (folder / cls.config_name).exists():
            check_saved_pipeline(folder)
            with loading(folder):
                pipe = super().from_pretrained(folder, dtype=torch_dtype, trust_remote_code=True, use_safetensors=True,
                                               **kwargs)
            pipe.glass_bank = saved_glass_bank(folder)
        else:
            pipe = cls.from_model_folder(folder, base_model, torch_dtype)
            scheduler = scheduler or "unipc"
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        if fuse:
            pipe.model.fuse_for_inference()
        return pipe

    @classmethod
    def from_model_folder(cls, folder: Path, base_model: str | Path | None = None,
                          torch_dtype: torch.dtype = torch.float32) -> HTDPipeline:
        """A folder the recipe wrote (adapter weights, the base named in `htd_config.json`), unfused."""
        parts = load_model_parts(folder, base_model, torch_dtype)
        crop_adapter = CropAdapter.from_unet(parts["unet"], parts["crop_encoder"]) if parts["crop_encoder"] else None
        pipe = cls(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                   unet=parts["unet"], controlnet=parts["controlnet"], scheduler=parts["scheduler"],
                   crop_adapter=crop_adapter, htd_config=parts["config"])
        pipe.glass_bank = parts["glass_bank"]
        return pipe

    @classmethod
    def from_model(cls, model: HTDModel, scheduler=None) -> HTDPipeline:
        """A pipeline over a model being trained (the recipe's validation), sharing its modules and prompt."""
        from diffusers import UniPCMultistepScheduler

        crop_adapter = CropAdapter.from_unet(model.unet, model.crop_encoder) if model.crop_encoder is not None else None
        pipe = cls(vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet, controlnet=model.controlnet,
                   scheduler=scheduler or UniPCMultistepScheduler.from_config(model.scheduler_config),
                   crop_adapter=crop_adapter, htd_config=model.config)
        pipe.prompt_embeds, pipe.glass_bank = model.prompt_embeds, model.glass_bank
        return pipe

    @classmethod
    def for_inference(cls, path_or_repo_id: str | Path, **kwargs) -> HTDPipeline:
        """`from_pretrained` on this machine's accelerator (bf16 on CUDA, fp32 elsewhere), without progress bars,
        as the commands run it."""
        from htd_toolkit.config import compute_device

        device = compute_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = cls.from_pretrained(path_or_repo_id, torch_dtype=dtype, **kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs) -> None:
        """The diffusers layout, self-contained (the base's components included): `model_index.json`, a folder per
        component, `htd_pipeline.py` (the class's import) and `htd_config.json`. The UNet and the ControlNet are
        written as stock models: LoRA merged into the weights, fused projections and crop adapter left out (the
        crop adapter is its own component)."""
        if kwargs.get("push_to_hub"):
            raise UserError("push a saved pipeline with `htd-toolkit push`, which uploads the whole folder")
        folder = Path(save_directory)
        unet, controlnet = self.unet, self.controlnet
        try:
            self.unet, self.controlnet = stock_copy(unet), stock_copy(controlnet)
            super().save_pretrained(folder, safe_serialization=safe_serialization, **kwargs)
        finally:
            self.unet, self.controlnet = unet, controlnet
        index = json.loads((folder / self.config_name).read_text())
        for path, (module, name, _) in SHIMS.items():
            key = "_class_name" if name == type(self).__name__ else path.split("/")[0]
            if index.get(key) not in (None, [None, None]):
                index[key] = [module, name]
                (folder / path).write_text(shim(path))
        (folder / self.config_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self.htd_config.save(folder)
        write_id2label(folder, self.htd_config.classes)
        if self.glass_bank is not None:
            self.glass_bank.save(folder / GLASS_BANK)

    # --- devices -----------------------------------------------------------------------------
    def to(self, *args, **kwargs) -> HTDPipeline:
        super().to(*args, **kwargs)
        self._glass = None
        if self.device.type == "cuda":  # convolution-heavy: NHWC is the faster layout on GPUs
            for module in (self.unet, self.controlnet, self.vae):
                module.to(memory_format=torch.channels_last)
        return self

    def compile(self, **options) -> HTDPipeline:
        """torch.compile the UNet, the ControlNet and the VAE decoder (the first batch pays the compilation,
        once per machine: the kernels are kept in the htd-toolkit cache)."""
        keep_compiled_kernels()
        self.unet = torch.compile(self.unet, **options)
        self.controlnet = torch.compile(self.controlnet, **options)
        self.vae.decoder = torch.compile(self.vae.decoder, **options)
        return self

    @property
    def model(self) -> HTDModel:
        """The components as the `HTDModel` the recipe trains: the per-step computation (ControlNet input, crop
        tokens, guided UNet call) is its, shared by training and generation."""
        view = self._model
        if view is None or any(getattr(view, name) is not module for name, module in (
                ("unet", self.unet), ("controlnet", self.controlnet), ("vae", self.vae),
                ("crop_encoder", self.crop_adapter))):
            embeds = self.prompt_embeds if self.prompt_embeds is not None else torch.zeros(0)
            self._model = HTDModel(self.htd_config, self.unet, self.controlnet, self.vae, embeds, self.crop_adapter,
                                   self.scheduler.config)
            saved_at = self.config.get("_name_or_path")
            if self.glass_bank is None and saved_at:  # a saved pipeline loaded by diffusers itself: its bank is beside it
                self.glass_bank = saved_glass_bank(Path(saved_at))
        self._model.glass_bank = self.glass_bank
        return self._model

    @property
    def vae_scale_factor(self) -> int:
        return self.model.vae_scale_factor

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # --- generation -----------------------------------------------------------------------
    def conditioning(self, maps: list[np.ndarray], crops: list[dict[int, np.ndarray]]) -> Conditioning:
        """Conditioning for H x W uint8 class maps and, per map, a crop (RGB uint8) for each class present: what
        `__call__` builds from `semantic_map` and `crops`, or takes ready-made as `conditioning=`."""
        config = self.htd_config
        items = [conditioning_for(m, c, config.crop_mode, config.max_crops, config.crop_size)
                 for m, c in zip(maps, crops, strict=True)]
        return Conditioning.stack(items)

    @torch.no_grad()
    def __call__(self, semantic_map=None, crops=None, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 guidance_scale: float = GUIDANCE_SCALE,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 keep_glass: bool = False, conditioning: Conditioning | None = None,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",)):
        """Generate images for semantic maps; the returned masks are the maps themselves.

        Args:
            semantic_map: an (H, W) class-id map (NumPy uint8, torch tensor or PIL image, class 0 background,
                255 ignored), a (B, H, W) batch, or a list of maps. H and W are multiples of the VAE's factor.
            crops: for a crop-conditioned model, per map a dict {class id: RGB uint8 crop (H, W, 3) or PIL
                image} with a crop for every tissue class the map holds (a single dict when there is one map);
                None for a model trained with `--crop_mode none`.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance on the crops (1.0 turns it off); the map is always kept.
            num_images_per_prompt: images per map (map i's are images i·n … i·n + n - 1).
            generator: a torch.Generator, or one per image (then each image depends on its own generator only,
                whatever the batch: `pipe.seeded(seeds)`); None draws from torch's global generator.
            latents: starting noise (B·n, C, H/f, W/f) instead of drawing it (scaled by the scheduler's
                `init_noise_sigma`, as diffusers does).
            output_type: "pil" (a list of PIL images), "np" ((B, H, W, 3) uint8), "pt" ((B, 3, H, W) float
                in [0, 1]) or "latent" (the final latents, undecoded).
            return_dict: an `HTDPipelineOutput` when True, else the tuple (images, masks).
            keep_glass: keep the map's background (class 0) real glass, tiles of the model's glass bank drawn
                from each map's generator (`models/background.py`); off by default, which leaves it to the
                model, which may paint tissue there (docs/fidelity.md §4).
            conditioning: instead of `semantic_map` and `crops`, their `pipe.conditioning(maps, crops)` built
                beforehand (as `prompt_embeds` stands for a prompt): `generate` builds the next batch's on a thread.
            callback_on_step_end: called as `callback(pipe, step, timestep, {name: tensor})` after every step
                with the tensors named in `callback_on_step_end_tensor_inputs`; the latents it returns continue.

        Returns:
            `HTDPipelineOutput` with `images` and `masks` ((B·n, H, W) uint8, the maps given).
        """
        self.check_inputs(semantic_map, crops, conditioning, num_inference_steps, guidance_scale, generator, output_type,
                          num_images_per_prompt, latents, callback_on_step_end_tensor_inputs, keep_glass)
        cond = conditioning if conditioning is not None else self.conditioning(
            as_maps(semantic_map), as_crops(crops, len(as_maps(semantic_map))))
        cond = cond.repeat(num_images_per_prompt)
        height, width = cond.class_map.shape[-2:]
        latents = self.prepare_latents(cond.class_map.shape[0], height, width, generator, latents)
        latents, glass = self.denoise(cond, latents, num_inference_steps, guidance_scale, keep_glass, generator,
                                      callback_on_step_end, callback_on_step_end_tensor_inputs)
        masks = cond.class_map.cpu().numpy().astype(np.uint8)
        images = latents if output_type == "latent" else self.decode_images(latents, glass)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(image) for image in images]
        elif output_type == "pt":
            images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        self.maybe_free_model_hooks()
        return HTDPipelineOutput(images=images, masks=masks) if return_dict else (images, masks)

    def check_inputs(self, semantic_map, crops, conditioning: Conditioning | None, num_inference_steps: int,
                     guidance_scale: float, generator=None, output_type: str = "np", num_images_per_prompt: int = 1,
                     latents: torch.Tensor | None = None,
                     callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
                     keep_glass: bool = False) -> None:
        """One clear error (an `InputError`, a ValueError) for the first input the model cannot take; every
        caller (`__call__`, `noise_prediction`, hence generate, generate-slide and the recipe's validation) goes
        through it."""
        if (semantic_map is None) == (conditioning is None):
            raise InputError("give semantic_map (with crops), or their conditioning, not both")
        maps = as_maps(semantic_map) if conditioning is None else list(conditioning.class_map.cpu().numpy())
        if not maps:
            raise InputError("semantic_map: give at least one map")
        if len({m.shape for m in maps}) != 1:
            raise InputError(f"semantic_map: every map must have the same size, got {sorted({m.shape for m in maps})}")
        f = self.vae_scale_factor
        height, width = maps[0].shape
        if not (height and width) or height % f or width % f:
            raise InputError(f"semantic_map: {width}x{height} is not a multiple of the VAE factor {f} (at least {f})")
        config = self.htd_config
        k = config.num_classes
        for index, labels in enumerate(maps):
            bad = np.unique(labels[(labels >= k) & (labels != 255)])
            if len(bad):
                raise InputError(f"semantic_map[{index}]: class id {int(bad[0])} is not one of the model's {k} "
                                 "classes (0 background, 255 ignored)")
        if config.crop_mode != "none":
            given = (as_crops(crops, len(maps)) if conditioning is None
                     else [set(c.tolist()) for c in conditioning.crop_classes.cpu()])
            for index, (labels, have) in enumerate(zip(maps, given, strict=True)):
                missing = sorted(set(classes_present(labels, config.max_crops)) - set(have))
                if missing:
                    raise InputError(f"crops[{index}]: no crop for class {missing[0]} of its map; this model "
                                     f"({config.crop_mode}) needs one per tissue class of the map")
        check_generation_settings(num_inference_steps, guidance_scale)
        if not isinstance(num_images_per_prompt, Integral) or num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be a whole number ≥ 1, got {num_images_per_prompt}")
        images = len(maps) * num_images_per_prompt
        per_map = f" ({num_images_per_prompt} per map)" if num_images_per_prompt > 1 else ""
        given = generator if isinstance(generator, list) else [] if generator is None else [generator]
        if wrong := sorted({type(g).__name__ for g in given if not isinstance(g, torch.Generator)}):
            raise InputError(f"generator: expected a torch.Generator or a list of them, got {', '.join(wrong)}")
        if isinstance(generator, list) and len(generator) != images:
            raise InputError(f"generator: {len(generator)} generators for {images} maps{per_map}")
        shape = (images, self.unet.config.in_channels, height // f, width // f)
        if latents is not None and not (torch.is_tensor(latents) and latents.is_floating_point()
                                        and bool(torch.isfinite(latents).all())):
            found = latents.dtype if torch.is_tensor(latents) else type(latents).__name__
            raise InputError(f"latents: expected a tensor of finite floats, got {found} (or NaN/infinite values)")
        if latents is not None and tuple(latents.shape) != shape:
            raise InputError(f"latents: shape {tuple(latents.shape)}, expected {shape}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        if keep_glass and output_type == "latent":
            raise InputError("keep_glass pastes real glass into the decoded pixels, and output_type='latent' has "
                             "none: choose 'np', 'pil' or 'pt'")
        if isinstance(callback_on_step_end_tensor_inputs, str):
            raise InputError(f"callback_on_step_end_tensor_inputs: a list of names, e.g. "
                             f"[{callback_on_step_end_tensor_inputs!r}], not the string {callback_on_step_end_tensor_inputs!r}")
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs: {unknown} are not among "
                             f"{self._callback_tensor_inputs}")

    def prepare_latents(self, batch: int, height: int, width: int, generator=None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Starting noise on the CPU (the same on every device): per image from its own generator when a list
        is given, as diffusers' `randn_tensor` does; `latents` when given."""
        if latents is not None:
            return latents
        f = self.vae_scale_factor
        shape = (self.unet.config.in_channels, height // f, width // f)
        if isinstance(generator, list):
            return torch.stack([torch.randn(shape, generator=g) for g in generator])
        return torch.randn((batch, *shape), generator=generator)

    @staticmethod
    def seeded(seeds: list[int]) -> list[torch.Generator]:
        """One CPU generator per seed: `generator=pipe.seeded(seeds)` makes each image depend on its seed only."""
        return [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    @torch.no_grad()
    def denoise(self, cond: Conditioning, latents: torch.Tensor, num_inference_steps: int = 25,
                guidance_scale: float = 2.0, keep_glass: bool = False, generator=None,
                callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs=("latents",)):
        """The denoising loop from collated conditioning and starting noise (what __call__ runs): the final latents
        and the glass canvas that `decode_images` pastes, None without `keep_glass`.

        A scheduler that draws noise at each step (DDPM) draws it from `generator` (one per sample, as for the
        starting noise), diffusers' `prepare_extra_step_kwargs`: the same seed gives the same image."""
        model, device = self.model, self._execution_device
        model.prompt_embeds = self.prompt_embeds.to(device)
        dtype = self.unet.dtype
        cond = cond.to(device, dtype)
        batch, (height, width) = cond.class_map.shape[0], cond.class_map.shape[-2:]
        f = self.vae_scale_factor
        self._guidance_scale = guidance_scale
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        guided = guidance_scale != 1.0 and self.htd_config.crop_mode != "none"
        step_inputs = self._step_inputs(cond, batch, (height // f, width // f), guided)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator and generator is not None else {}
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for index, t in enumerate(timesteps):
                noise = self._predict(latents, t, guided, guidance_scale, *step_inputs)
                latents = self.scheduler.step(noise, t, latents, return_dict=False, **step_kwargs)[0]
                if callback_on_step_end is not None:
                    named = {"latents": latents}
                    outputs = callback_on_step_end(self, index, t, {k: named[k] for k in callback_on_step_end_tensor_inputs})
                    latents = callback_latents(outputs, latents, index)
                progress_bar.update()
        # drawn after the steps, whose noise (DDPM's) comes from the same generators: the tissue stays the same
        return latents, glass_for(self.glass_tiles, cond.class_map, generator) if keep_glass else None

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor, glass=None) -> np.ndarray:
        """Images (B, H, W, 3) uint8 from final latents, the glass canvas pasted where `glass` says."""
        vae = self.vae
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0].float()
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
    def noise_prediction(self, latents: torch.Tensor, t: torch.Tensor, semantic_map=None, crops=None,
                         guidance_scale: float = 2.0, conditioning: Conditioning | None = None) -> torch.Tensor:
        """The low-level hook of `generate-slide`: the guided noise estimate of one step for latents (B, C, h, w)
        under their maps and crops (checked by `check_inputs`, as `__call__` takes them), computed as `__call__`
        does at each step. The tiler blends the estimates of overlapping windows before its scheduler steps."""
        self.check_inputs(semantic_map, crops, conditioning, 1, guidance_scale, latents=latents)
        cond = conditioning if conditioning is not None else self.conditioning(
            as_maps(semantic_map), as_crops(crops, latents.shape[0]))
        device, dtype = self._execution_device, self.unet.dtype
        self.model.prompt_embeds = self.prompt_embeds.to(device)
        cond = cond.to(device, dtype)
        guided = guidance_scale != 1.0 and self.htd_config.crop_mode != "none"
        step_inputs = self._step_inputs(cond, latents.shape[0], tuple(latents.shape[-2:]), guided)
        return self._predict(latents.to(device, dtype), t, guided, guidance_scale, *step_inputs)

    def _step_inputs(self, cond: Conditioning, batch: int, latent_size: tuple[int, int], guided: bool):
        """What stays the same at every step: ControlNet input(s) and crop kwargs, CFG halves stacked."""
        model = self.model
        keep = torch.ones(batch, dtype=torch.bool, device=self._execution_device)
        cn_cond = model.controlnet_input(cond, keep_crops=keep)
        # token modes: the ControlNet never sees the crops, so both halves give it the same input
        shared = self.share_controlnet and self.htd_config.crop_mode != "canvas"
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
    """`images`: PIL images, a (B, H, W, 3) uint8 array, a (B, 3, H, W) tensor or latents; `masks`: (B, H, W) uint8,
    the semantic maps the images were made for (exact by construction)."""

    images: list | np.ndarray | torch.Tensor
    masks: np.ndarray


def stock_copy(model):
    """`model` (a UNet or ControlNet) as the stock class with its stock weights, sharing their tensors: any LoRA
    merged into them (PEFT's delta), fused q/k/v projections and installed crop-adapter parts left out, so that
    `save_pretrained` writes what `from_pretrained` of that class reads."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                if adapter not in module.merged_adapters:
                    weight = weight + module.get_delta_weight(adapter)
            state[f"{name}.weight"] = weight
            if module.get_base_layer().bias is not None:
                state[f"{name}.bias"] = module.get_base_layer().bias
    for key, value in model.state_dict().items():
        if ".lora_" in key or ".base_layer." in key or ".processor." in key or key.startswith("encoder_hid_proj."):
            continue
        if ".to_qkv." in key or ".to_kv." in key:
            continue
        state.setdefault(key, value)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    if config.get("encoder_hid_dim_type") == "ip_image_proj":
        config["encoder_hid_dim_type"] = None
    with torch.device("meta"):
        copy = type(model).from_config(config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.to(model.dtype)


def pipeline_layout(folder: Path, out: Path, base_model: str | Path | None = None) -> dict[str, Path]:
    """The saved pipeline's files (`HTDPipeline.save_pretrained`, written under `out`) that a model folder the
    recipe wrote lacks, by repo path: what `push` uploads beside it so that `DiffusionPipeline.from_pretrained`
    loads the repo alone. None for a folder that holds a saved pipeline already."""
    folder = Path(folder)
    if (folder / HTDPipeline.config_name).exists():
        return {}
    try:
        pipe = HTDPipeline.from_pretrained(folder, base_model=base_model, fuse=False)
    except UserError as err:  # e.g. a local base that is not embedded: the adapter files still go up
        logger.warning("%s: pushed without the diffusers pipeline layout (model_index.json): %s", folder, err)
        return {}
    pipe.save_pretrained(out)
    return {path.relative_to(out).as_posix(): path for path in sorted(out.rglob("*"))
            if path.is_file() and not (folder / path.relative_to(out)).exists()}


def check_saved_pipeline(folder: Path) -> None:
    """Before anything of a saved pipeline is loaded (a Hub repo is anyone's): its module files (`SHIMS`) must be the
    toolkit's one-line imports, as they are run to find the classes, and its components' weights safetensors files
    of finite floats (`check_weight_file`; diffusers then reads nothing else)."""
    index_path = folder / HTDPipeline.config_name
    with loading(index_path):
        index = json.loads(index_path.read_text())
    if not isinstance(index, dict):
        raise UserError(f"{index_path}: not a JSON object")
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list):
            continue
        if len(entry) != 2 or not all(part is None or isinstance(part, str) for part in entry):
            raise UserError(f"{index_path}: {component} {entry!r} is not [library, class]")
        if entry[0] is None:
            continue
        # diffusers imports `<component>/<library>.py` when the folder has one, whatever the library's name
        module_file = folder / component / f"{entry[0]}.py"
        if module_file.exists() and f"{component}/{entry[0]}.py" not in SHIMS:
            raise UserError(f"{module_file}: a module file htd-toolkit does not write; refused, as it would run as "
                            "code (if you trust it, load with DiffusionPipeline.from_pretrained(..., "
                            "trust_remote_code=True))")
        for path in sorted((folder / component).glob("*.safetensors")):
            check_weight_file(path)
    for path, (module, name, _) in SHIMS.items():
        key = "_class_name" if name == HTDPipeline.__name__ else path.split("/")[0]
        if index.get(key) in (None, [None, None]) and key != "_class_name":
            continue
        if index.get(key) != [module, name]:
            raise UserError(f"{folder / HTDPipeline.config_name}: {key} {index.get(key)!r} is not {[module, name]}: "
                            "not a pipeline htd-toolkit saved")
        if not (folder / path).is_file() or (folder / path).read_text() != shim(path):
            raise UserError(f"{folder / path}: not the file htd-toolkit writes (the class's import); refused, as it "
                            "would run as code (if you trust it, load with DiffusionPipeline.from_pretrained(..., "
                            "trust_remote_code=True))")


def callback_latents(outputs, latents: torch.Tensor, step: int) -> torch.Tensor:
    """The latents a step-end callback returned to continue from (a dict, as diffusers takes it; the latents it was
    given when it names none), checked: a float tensor of their shape."""
    if not isinstance(outputs, dict):
        raise InputError(f"callback_on_step_end returned {type(outputs).__name__} at step {step}: expected a dict "
                         "such as the one it was given")
    returned = outputs.pop("latents", latents)
    if not (torch.is_tensor(returned) and returned.is_floating_point() and returned.shape == latents.shape):
        found = f"{returned.dtype} {tuple(returned.shape)}" if torch.is_tensor(returned) else type(returned).__name__
        raise InputError(f"callback_on_step_end: the latents it returned at step {step} are {found}, expected a "
                         f"float tensor of shape {tuple(latents.shape)}")
    return returned.to(latents.device, latents.dtype)


def as_maps(semantic_map) -> list[np.ndarray]:
    """A map, a batch or a list of maps (NumPy, torch or PIL) → a list of (H, W) uint8 arrays."""
    if isinstance(semantic_map, (list, tuple)):
        return [m for item in semantic_map for m in as_maps(item)]
    array = semantic_map.detach().cpu().numpy() if torch.is_tensor(semantic_map) else np.asarray(semantic_map)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(f"semantic_map: expected (H, W) or (B, H, W) class ids, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255 or not np.all(np.equal(np.mod(array, 1), 0))):
        raise InputError("semantic_map: class ids must be whole numbers from 0 to 255")
    return [np.ascontiguousarray(m, dtype=np.uint8) for m in array]


def as_crops(crops, count: int) -> list[dict[int, np.ndarray]]:
    """None, one dict (one map) or a list of dicts → a list of {class: RGB uint8 array}, one per map."""
    if crops is None:
        return [{} for _ in range(count)]
    crops = [crops] if isinstance(crops, dict) else list(crops)
    if len(crops) != count:
        raise InputError(f"crops: {len(crops)} crop dicts for {count} maps")
    if not all(isinstance(item, dict) for item in crops):
        raise InputError("crops: expected a dict {class id: RGB crop} per map")
    for index, item in enumerate(crops):
        named = [c for c in item if not isinstance(c, numbers.Integral) or isinstance(c, bool)]
        if named:
            raise InputError(f"crops[{index}]: key {named[0]!r} is not a class id; crops are keyed by the class index "
                             "of the map (pipe.htd_config.classes names them)")
    arrays = [{int(c): np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
               for c, image in item.items()} for item in crops]
    for index, item in enumerate(arrays):
        for c, crop in item.items():
            if crop.ndim != 3 or crop.shape[2] != 3 or not crop.size:
                raise InputError(f"crops[{index}][{c}]: expected an RGB crop (H, W, 3), got shape {crop.shape}")
    return arrays


def saved_glass_bank(folder: Path) -> GlassBank | None:
    """The glass bank a saved pipeline's folder holds, if it is a local folder that has one."""
    return GlassBank.load(folder / GLASS_BANK) if (folder / GLASS_BANK).is_file() else None
