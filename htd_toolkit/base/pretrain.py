"""A small Stable-Diffusion-layout base trained from scratch on H&E (`htd-toolkit pretrain-base`).

No pretrained Stable Diffusion can be downloaded where the tests and the demo run, so they use the
nearest honest thing: an `AutoencoderKL` (f = 4) and a `UNet2DConditionModel` with SD1.5's
cross-attention blocks, trained here on patches of real slides, saved as a diffusers folder that
`StableDiffusionPipeline.from_pretrained(DIR)` loads. The text encoder and tokenizer are the tiny
random ones of `tiny_base` (HTD conditions on maps and crops; the prompt is a constant).

Training, in two resumable stages whose every random draw derives from (seed, stage, step):
1. the VAE: L1 + L1 of image gradients (keeps nuclear edges) + a small KL term; its latents are then
   whitened per channel (mean 0, std 1 over the training patches) by folding the shift and scale into
   its two 1x1 convolutions, so the decoder is unchanged and `scaling_factor` is 1. Uncentred latents
   (one channel had mean -1.56 at std 0.56) left the UNet to learn the mean colour from pure noise, which
   an undertrained model gets wrong: washed-out, bluish samples. SD3 and Flux have a `shift_factor`
   for this; folding it into the weights keeps `StableDiffusionPipeline` (which has none) exact;
2. the UNet: ε-prediction with min-SNR-5 weighting on the latents of the training patches (encoded
   once), AdamW, an EMA of the weights (what is saved).
Patches are drawn from tissue (saturation, as `prepare` detects it) with flips/rot90 and mild stain
jitter in HED space; the bottom `holdout_fraction` of every slide is kept apart for the VAE's PSNR.

The weights trained on the CC0 sample slide ship in the package (`htd_toolkit/base/shipped.py`, fp16
safetensors): a toy base on one slide, not a realistic generator. docs/fidelity.md has the command and
its figures.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from htd_toolkit.config import compute_device
from htd_toolkit.data.outputs import Claim, claim_folder
from htd_toolkit.data.stain import stain_jitter
from htd_toolkit.errors import UserError
from htd_toolkit.seeding import derive_seed

# Sizes chosen by timing on 2 CPU cores (docs/fidelity.md): about 0.9 s per VAE step of 16 and 1 s per
# UNet step of 32 patches; the next sizes up cost 1.3-4.8 s per UNet step.
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
           block_out_channels=[16, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
           up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8)
UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 128],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=16)
STATE = ".work"


@dataclass
class PretrainOptions:
    slides: list[Path]
    out: Path
    patch_size: int = 64
    mpp: float = 1.0
    vae_steps: int = 700
    unet_steps: int = 1400
    minutes: float | None = None  # resolved into step counts by timing a few steps of each stage
    vae_share: float = 0.3  # of --minutes, for the VAE
    seed: int = 0
    patches: int = 6000  # training patches in the pool, over all slides
    holdout_fraction: float = 0.2
    vae_batch: int = 16
    unet_batch: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    ema_decay: float = 0.999
    overwrite: bool = False
    # Random draws stay on the CPU, so a run draws the same batches, noise and timesteps on any device.
    device: str = field(default_factory=lambda: str(compute_device()))

    def check(self) -> None:
        if self.patch_size % 16 or self.patch_size < 32:
            raise UserError(f"--patch-size {self.patch_size}: a multiple of 16, at least 32")
        if not (math.isfinite(self.mpp) and 0.05 <= self.mpp <= 50):
            raise UserError(f"--mpp {self.mpp}: expected a resolution between 0.05 and 50 µm/px")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise UserError(f"--minutes {self.minutes}: expected a positive number")
        if min(self.vae_steps, self.unet_steps, self.patches) < 1:
            raise UserError("--steps, --vae-steps and --patches must be at least 1")
        if not 0 < self.holdout_fraction < 1:
            raise UserError(f"--holdout-fraction {self.holdout_fraction}: expected a value in (0, 1)")


# --- patches -----------------------------------------------------------------------------------------

def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of an H x W x C array (k in 0..7)."""
    image = np.rot90(image, k % 4)
    return np.ascontiguousarray(image[:, ::-1] if k >= 4 else image)


def tissue_windows(slide, size0: int, band: tuple[float, float], count: int, rng: np.random.Generator,
                   min_tissue: float = 0.5) -> list[tuple[int, int]]:
    """`count` random level-0 top-left corners of size0-pixel windows inside the vertical band (fractions
    of the height) whose tissue covers at least `min_tissue` (the overview's tissue mask)."""
    from htd_toolkit.wsi.tissue import tissue_mask

    overview, downsample = slide.overview(8.0)
    mask, _ = tissue_mask(overview)
    width, height = slide.dimensions
    top, bottom = int(band[0] * height), int(band[1] * height) - size0
    if bottom <= top or width <= size0:
        raise UserError(f"{slide.path.name}: too small for {size0}-pixel windows in its "
                        f"{'held-out' if band[0] > 0 else 'training'} band")
    corners, tries = [], 0
    while len(corners) < count and tries < 200 * count:
        tries += 1
        x, y = int(rng.integers(0, width - size0)), int(rng.integers(top, bottom))
        r0, c0 = int(y / downsample), int(x / downsample)
        r1, c1 = max(r0 + 1, int((y + size0) / downsample)), max(c0 + 1, int((x + size0) / downsample))
        if mask[r0:r1, c0:c1].mean() >= min_tissue:
            corners.append((x, y))
    if not corners:
        raise UserError(f"{slide.path.name}: no window with enough tissue at this patch size and mpp")
    return corners


def read_patches(options: PretrainOptions, holdout: bool) -> np.ndarray:
    """uint8 (N, S, S, 3) tissue patches: the training pool (augmented) or the held-out set (as read)."""
    from htd_toolkit.wsi.slide import Slide

    size = options.patch_size
    per_slide = max(1, (64 if holdout else options.patches) // len(options.slides))
    band = (1 - options.holdout_fraction, 1.0) if holdout else (0.0, 1 - options.holdout_fraction)
    out = []
    for index, path in enumerate(options.slides):
        rng = np.random.default_rng(derive_seed(options.seed, "patches", holdout, index))
        with Slide(path) as slide:
            size0 = slide.level0_size(size, options.mpp)
            for x, y in tissue_windows(slide, size0, band, per_slide, rng):
                patch = slide.read_box(x, y, size0, size0, options.mpp, size, size)[..., :3]
                if not holdout:
                    patch = stain_jitter(dihedral(patch, int(rng.integers(8))), rng)
                out.append(patch)
    return np.stack(out)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- models ------------------------------------------------------------------------------------------

def build_components(seed: int, patch_size: int = 64):
    """Untrained VAE, UNet, scheduler, and the tiny text encoder + tokenizer; the pipeline's default
    image side is `patch_size`."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from htd_toolkit.base.components import SCHEDULER, TEXT_ENCODER, build_tokenizer

    torch.manual_seed(seed)
    return dict(vae=AutoencoderKL(**{**VAE, "sample_size": patch_size}),
                unet=UNet2DConditionModel(**{**UNET, "sample_size": patch_size // 4}),
                text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)), tokenizer=build_tokenizer(),
                scheduler=PNDMScheduler.from_config(SCHEDULER))


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float = 1e-6) -> torch.Tensor:
    images = images.to(vae.device)
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(vae.device)
    recon = vae.decode(posterior.mean + posterior.std * noise).sample
    edges = sum(F.l1_loss(a, b) for a, b in zip(image_gradients(recon), image_gradients(images), strict=True))
    return F.l1_loss(recon, images) + edges + kl_weight * posterior.kl().mean()


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch):
        x = to_model_range(images[start:start + batch]).to(vae.device)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR in dB of uint8 image sets."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(to_model_range(images[start:start + batch]).to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def whiten_latents(vae, means: torch.Tensor, stds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-channel shift and scale into the VAE so its latent means have mean 0 and std 1 over
    `means`; returns the posterior means and stds re-expressed in the new latent space. Exact:
    quant_conv's mean rows become (W x + b - m) / s and its log-variance rows lose 2 log s;
    post_quant_conv sees s z' + m, the latent it was trained on."""
    shift = means.mean(dim=(0, 2, 3)).to(vae.device)
    scale = means.std(dim=(0, 2, 3)).to(vae.device)
    channels = len(shift)
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:channels] /= scale.view(-1, 1, 1, 1)
    quant.bias[:channels] = (quant.bias[:channels] - shift) / scale
    quant.bias[channels:] -= 2 * torch.log(scale)
    post.bias += post.weight[:, :, 0, 0] @ shift
    post.weight *= scale.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    view = (1, -1, 1, 1)
    shift, scale = shift.cpu(), scale.cpu()
    return (means - shift.view(view)) / scale.view(view), stds / scale.view(view)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023): min(SNR, γ) / SNR."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


# --- training ----------------------------------------------------------------------------------------

class Stage:
    """One resumable training stage: a model, its AdamW, an optional EMA, a step counter on disk."""

    def __init__(self, name: str, model, lr: float, steps: int, folder: Path, ema_decay: float | None = None):
        from diffusers.training_utils import EMAModel

        self.name, self.model, self.steps, self.path = name, model, steps, folder / STATE / f"{name}.pt"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.ema = EMAModel(model.parameters(), decay=ema_decay, use_ema_warmup=True) if ema_decay else None
        self.step = 0
        self.recent_loss: float | None = None  # mean of the last 50 losses; kept in the state for resumed runs

    def set_lr(self, base_lr: float) -> None:
        """Linear warm-up over 100 steps, then cosine decay to 10 % at the last step."""
        warm = min(1.0, (self.step + 1) / 100)
        progress = min(1.0, self.step / max(1, self.steps))
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "steps": self.steps, "ema": self.ema.state_dict() if self.ema else None,
                 "recent_loss": self.recent_loss}
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(state, partial)
        partial.replace(self.path)

    def resume(self) -> None:
        if not self.path.exists():
            return
        try:
            state = torch.load(self.path, weights_only=True, map_location=next(self.model.parameters()).device)
        except Exception as err:  # torch raises many kinds for a damaged or foreign file
            raise UserError(f"{self.path}: not a pretrain-base state ({type(err).__name__}); delete it to "
                            "start this stage again") from err
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.steps = state["step"], state["steps"]
        self.recent_loss = state.get("recent_loss")
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])

    def run(self, loss_fn, base_lr: float, bar=None, every_seconds: float = 60.0) -> float | None:
        """Train to `steps`, saving every `every_seconds`; returns the mean loss of the last 50 steps (None
        for a stage resumed complete from a state saved before losses were kept)."""
        losses, last_save = [], time.monotonic()
        self.model.train()
        while self.step < self.steps:
            self.set_lr(base_lr)
            loss = loss_fn(self.step)
            if not torch.isfinite(loss):
                raise UserError(f"the {self.name} loss became {loss.item()} at step {self.step}; lower its "
                                "learning rate (the last checkpoint in .work/ is kept)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            if self.ema:
                self.ema.step(self.model.parameters())
            self.step += 1
            losses = ([*losses, loss.item()])[-50:]
            if bar:
                bar(1)
            if time.monotonic() - last_save > every_seconds:
                self.save()
                last_save = time.monotonic()
        if losses:
            self.recent_loss = float(np.mean(losses))
        self.save()
        return self.recent_loss


def seconds_per_step(loss_fn, model, trials: int = 3) -> float:
    """Wall time of a forward + backward (no update) after one warm-up step."""
    loss_fn(0).backward()
    synchronize = torch.cuda.synchronize if next(model.parameters()).is_cuda else lambda: None
    synchronize()
    start = time.perf_counter()
    for i in range(trials):
        loss_fn(i).backward()
    synchronize()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / trials


def vae_loss_fn(vae, pool: np.ndarray, options: PretrainOptions):
    def loss(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(options.seed, "vae", step))
        index = torch.randint(0, len(pool), (options.vae_batch,), generator=generator).numpy()
        return vae_loss(vae, to_model_range(pool[index]), generator)
    return loss


def unet_loss_fn(unet, scheduler, means: torch.Tensor, stds: torch.Tensor, scale: float, text: torch.Tensor,
                 options: PretrainOptions):
    def loss(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(options.seed, "unet", step))
        index = torch.randint(0, len(means), (options.unet_batch,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps).to(unet.device)
        prediction = unet(noisy, timesteps.to(unet.device), encoder_hidden_states=text.expand(len(index), -1, -1)).sample
        per_sample = F.mse_loss(prediction, noise.to(unet.device), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(scheduler, timesteps).to(unet.device)).mean()
    return loss


def resolve_minutes(options: PretrainOptions, vae_loss_fn_, vae, unet_timing) -> None:
    """Turn --minutes into step counts from the measured time of each stage's step (saved, so a resumed
    run keeps them; the report prints them, so the run can be repeated exactly with --steps)."""
    budget = options.minutes * 60
    vae_seconds = seconds_per_step(vae_loss_fn_, vae)
    unet_seconds = unet_timing()
    options.vae_steps = max(1, int(budget * options.vae_share / vae_seconds))
    options.unet_steps = max(1, int(budget * (1 - options.vae_share) / unet_seconds))


BASE_OUTPUTS = ("model_index.json", "vae/*", "unet/*", "text_encoder/*", "tokenizer/*", "scheduler/*", "assets/*",
                "pretrain_report.json")  # besides the training state in .work/
RECORDED = ("patch_size", "mpp", "vae_steps", "unet_steps", "minutes", "vae_share", "seed", "patches",
            "holdout_fraction", "vae_batch", "unet_batch", "vae_lr", "unet_lr", "ema_decay")


def check_out(options: PretrainOptions) -> None:
    """--out is new, empty or this command's run with the same options; never a folder holding a slide."""
    recorded = {key: value for key, value in asdict(options).items() if key in RECORDED}
    claim_folder(Claim(options.out, "pretrain-base", recorded, BASE_OUTPUTS, (), tuple(options.slides),
                       options.overwrite))


def stage_bar(bar_factory, stage: Stage):
    """A progress bar for a stage, advanced to where a resumed stage starts."""
    if bar_factory is None:
        return None
    advance = bar_factory(f"training the {stage.name}", stage.steps)
    advance(stage.step)
    return advance


def pretrain_base(options: PretrainOptions, bar_factory=None) -> dict:
    """Train the VAE then the UNet (resuming whatever `.work/` holds) and save the diffusers folder."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from htd_toolkit.models.htd_model import encode_prompt

    options.check()
    check_out(options)
    plan_path = options.out / STATE / "plan.json"
    if plan_path.exists():  # a resumed run keeps the options (and resolved steps) it started with
        saved = json.loads(plan_path.read_text())
        options.vae_steps, options.unet_steps, options.minutes = saved["vae_steps"], saved["unet_steps"], None
    started = time.monotonic()
    parts = build_components(options.seed, options.patch_size)
    vae, unet = parts["vae"].to(options.device), parts["unet"].to(options.device)
    train_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    text = encode_prompt(parts["tokenizer"], parts["text_encoder"], "").to(options.device)
    pool = read_patches(options, holdout=False)
    held_out = read_patches(options, holdout=True)
    vae_fn = vae_loss_fn(vae, pool, options)
    if options.minutes is not None:
        probe_latents = torch.randn(options.unet_batch, 4, options.patch_size // 4, options.patch_size // 4)
        resolve_minutes(options, vae_fn, vae, lambda: seconds_per_step(
            unet_loss_fn(unet, train_scheduler, probe_latents, probe_latents.abs(), 1.0, text, options), unet))
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps({k: v for k, v in asdict(options).items() if k not in ("slides", "out")}
                                    | {"slides": len(options.slides)}, indent=2, default=str))

    vae_stage = Stage("vae", vae, options.vae_lr, options.vae_steps, options.out)
    vae_stage.resume()
    vae_loss_value = vae_stage.run(vae_fn, options.vae_lr, stage_bar(bar_factory, vae_stage))
    vae.eval().requires_grad_(False)
    means, stds = whiten_latents(vae, *encode_latents(vae, pool))
    scale = vae.config.scaling_factor

    unet_stage = Stage("unet", unet, options.unet_lr, options.unet_steps, options.out, options.ema_decay)
    unet_stage.resume()
    unet_loss_value = unet_stage.run(unet_loss_fn(unet, train_scheduler, means, stds, scale, text, options),
                                     options.unet_lr, stage_bar(bar_factory, unet_stage))
    unet_stage.ema.copy_to(unet.parameters())
    unet.eval()

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.to("cpu").save_pretrained(options.out)
    report = {"vae_psnr_held_out_db": round(psnr(held_out, reconstruct(vae, held_out)), 2),
              "held_out_patches": len(held_out), "training_patches": len(pool),
              "vae_steps": options.vae_steps, "unet_steps": options.unet_steps,
              "vae_final_loss": rounded(vae_loss_value), "unet_final_loss": rounded(unet_loss_value),
              "latent_scaling_factor": round(scale, 5), "seed": options.seed, "patch_size": options.patch_size,
              "mpp": options.mpp, "minutes_this_run": round((time.monotonic() - started) / 60, 1),
              "parameters": {"vae": sum(p.numel() for p in vae.parameters()),
                             "unet": sum(p.numel() for p in unet.parameters())}}
    report["device"] = options.device
    report["sample_grid"] = write_sample_grid(options.out, held_out, options.seed,
                                              device=options.device).relative_to(options.out).as_posix()
    (options.out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def write_sample_grid(folder: Path, real: np.ndarray, seed: int, count: int = 16, device: str = "cpu") -> Path:
    """assets/sample_grid.png: generated patches (top rows, loaded back with StableDiffusionPipeline)
    above held-out real ones."""
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generated = pipe([""] * count, num_inference_steps=25, guidance_scale=1.0, output_type="np",
                     generator=torch.Generator().manual_seed(seed)).images
    generated = (generated * 255).round().astype(np.uint8)
    rows = [np.concatenate(list(generated[i:i + 8]), axis=1) for i in range(0, count, 8)]
    rows += [np.concatenate(list(real[i:i + 8]), axis=1) for i in range(0, min(count, len(real) // 8 * 8), 8)]
    path = folder / "assets" / "sample_grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def export_fp16(folder: Path, target: Path) -> Path:
    """Copy a trained base to `target` with its weights in fp16 (what ships in the package)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(target)
    for name in ("pretrain_report.json", "assets"):
        source = folder / name
        if source.is_dir():
            shutil.copytree(source, target / name, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, target / name)
    return target
