"""The training step shared by the recipe and its benchmark: precision set-up, optimizer, loss.

Frozen weights (UNet, VAE) are stored in the mixed-precision dtype rather than cast by autocast at
every call; trainable weights stay fp32. On CUDA the UNet and ControlNet run channels_last and AdamW
is fused (bitsandbytes' 8-bit AdamW on request). The recipe draws each sample's noise, timestep and
condition dropout from a generator seeded by (seed, step, sample key): resumed runs are exact, and a
sample's draws do not depend on which process trains it or on what else is in its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from htd_toolkit.models.conditioning import Conditioning
from htd_toolkit.seeding import derive_seed

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_for_training(model, device: torch.device | str, mixed_precision: str | None) -> torch.dtype:
    """Move the model to `device`, frozen parts in the compute dtype, trainable parts in fp32."""
    weight_dtype = DTYPES.get(str(mixed_precision), torch.float32)
    model.to(device)
    model.vae.to(dtype=weight_dtype)
    model.unet.to(dtype=weight_dtype)
    for param in model.trainable_parameters():
        param.data = param.data.float()
    if torch.device(device).type == "cuda":
        model.unet.to(memory_format=torch.channels_last)
        model.controlnet.to(memory_format=torch.channels_last)
    return weight_dtype


def make_optimizer(model, learning_rate: float, lora_learning_rate: float, weight_decay: float = 1e-2,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, eight_bit: bool = False):
    """AdamW with one rate for the ControlNet and crop adapter and another for the LoRA; fused on CUDA;
    bitsandbytes' AdamW8bit when `eight_bit` (as diffusers' `--use_8bit_adam`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "lora_" not in n], "lr": learning_rate},
              {"params": [p for n, p in named if "lora_" in n], "lr": lora_learning_rate}]
    groups = [g for g in groups if g["params"]]
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps, weight_decay=weight_decay)
    fused = all(p.is_cuda for _, p in named)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host → device without making the host wait for the GPU (pinned source, asynchronous copy on CUDA)."""
    if torch.device(device).type != "cuda" or tensor.is_cuda:
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def batch_to_device(batch: dict, device: torch.device | str) -> dict:
    """Every tensor and the conditioning of a training batch on `device`; other entries (keys) as they are."""
    return {k: to_device(v, device) if torch.is_tensor(v) else v.to(device) if isinstance(v, Conditioning) else v
            for k, v in batch.items()}


def step_generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def sample_generators(seed: int, step: int, keys: list[str]) -> list[torch.Generator]:
    """One generator per sample of micro-batch `step`, from the sample's key: its draws are the same whichever
    process trains it, in whatever batch."""
    return [step_generator(seed, step, key) for key in keys]


def training_loss(model, noise_scheduler, batch: dict, generator: torch.Generator | list[torch.Generator],
                  config) -> torch.Tensor:
    """ε- (or v-) prediction MSE on one batch; each sample's noise, timestep and dropout drawn from its own
    generator (a list, one per sample) or, one sample after the other, from a single one.

    The batch holds `pixel_values` (encoded here by the frozen VAE) or precomputed `latents`.
    """
    inner = model.module if hasattr(model, "module") else model
    latents = batch["latents"] if "latents" in batch else inner.encode_images(batch["pixel_values"])
    batch_size, device = latents.shape[0], latents.device
    generators = generator if isinstance(generator, list) else [generator] * batch_size
    draws = [sample_draws(g, latents.shape[1:], noise_scheduler.config.num_train_timesteps, config)
             for g in generators]
    # drawn on the host, so a seed gives the same step on every device; copied without a host sync
    noise, timesteps, keep_crops, keep_map = (torch.stack(parts) for parts in zip(*draws, strict=True))
    noise = to_device(noise, device).to(latents.dtype)
    timesteps, keep_crops, keep_map = (to_device(x, device) for x in (timesteps, keep_crops, keep_map))
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, batch["conditioning"], keep_map=keep_map, keep_crops=keep_crops)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


def sample_draws(generator: torch.Generator, shape: torch.Size, timesteps: int, config):
    """One sample's noise, timestep, and whether its crops and its map are kept."""
    noise = torch.randn(shape, generator=generator)
    timestep = torch.randint(0, timesteps, (), generator=generator)
    keep_crops = torch.rand((), generator=generator) >= config.crop_dropout
    keep_map = torch.rand((), generator=generator) >= config.map_dropout
    return noise, timestep, keep_crops, keep_map
