"""Training-step throughput: the recipe's step against a plain diffusers-style LoRA + ControlNet step.

Same shapes, same batch, both on latents (VAE encoding of the images excluded on both sides). The plain step is diffusers'
train_controlnet.py / LoRA example step: fp32 weights under bf16 autocast,
3-channel control, stock AdamW. Ours is `htd_toolkit.models.training`: K = 3 one-hot map, crop
adapter with 3 region-masked crops (it does more work), frozen weights stored in bf16, channels_last,
fused AdamW, optionally torch.compile. Prints samples/s for both and the ratio.

    python benchmarks/train.py --shape toy            # CPU, seconds
    python benchmarks/train.py --shape sd15 --batch 8  # GPU, SD1.5 shapes, random weights
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from htd_toolkit.testing.tiny_base import SD15_UNET, SD15_VAE

SHAPES = {
    "toy": dict(resolution=64, unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                         block_out_channels=(32, 32, 64, 64),
                                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                         cross_attention_dim=32, attention_head_dim=4),
                vae=dict(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                         norm_num_groups=4),
                crop_size=32, embed_dim=64),
    "sd15": dict(resolution=512, unet=SD15_UNET, vae=SD15_VAE, crop_size=64, embed_dim=256),
}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(step, device: str, warm: int, reps: int) -> float:
    for _ in range(warm):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plain_step(shape: dict, batch: int, device: str):
    """The stock step of diffusers' training examples: LoRA UNet + ControlNet, fp32 under bf16 autocast."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds less per SD1.5 model than on the host
        unet = UNet2DConditionModel(**shape["unet"])
        controlnet = ControlNetModel.from_unet(unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.train()
    controlnet.train()
    params = [p for p in unet.parameters() if p.requires_grad] + list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    res, lat = shape["resolution"], shape["resolution"] // 8
    x = torch.randn(batch, 4, lat, lat, device=device)
    c = torch.randn(batch, 3, res, res, device=device)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            down, mid = controlnet(x, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
            pred = unet(x, t, encoder_hidden_states=e, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
        F.mse_loss(pred.float(), x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_training(shape: dict, batch: int, device: str, crop_dropout: float = 0.1):
    """The recipe's model, optimizer and a fixed batch of latents, map and 3 crops, at `shape`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from htd_toolkit.models.conditioning import Conditioning
    from htd_toolkit.models.htd_model import HTDConfig, HTDModel
    from htd_toolkit.models.training import make_optimizer, prepare_for_training

    torch.manual_seed(0)
    classes = [{"index": i, "name": n, "color": "#000000"} for i, n in enumerate(["background", "normal", "tumor"])]
    config = HTDConfig(base_model="local:random", classes=classes, resolution=shape["resolution"], crop_mode="adapter",
                       crop_size=shape["crop_size"], max_crops=3, embed_dim=shape["embed_dim"], lora_rank=16,
                       lora_alpha=16, crop_dropout=crop_dropout)
    prompt = torch.randn(1, 77, shape["unet"]["cross_attention_dim"])
    with torch.device(device):
        unet = UNet2DConditionModel(**shape["unet"])
        vae = AutoencoderKL(**shape["vae"])
        model = HTDModel.from_components(config, unet, vae, prompt, DDPMScheduler.from_config(SCHEDULER).config)
    prepare_for_training(model, device, "bf16" if device == "cuda" else "no")
    optimizer = make_optimizer(model, 1e-5, 1e-4)
    model.train()
    res, lat = shape["resolution"], shape["resolution"] // 8
    class_map = torch.zeros(batch, res, res, dtype=torch.long, device=device)
    class_map[:, :, : res // 2] = 1
    class_map[:, res // 2:, res // 2:] = 2
    crops = torch.rand(batch, 3, 3, shape["crop_size"], shape["crop_size"], device=device) * 2 - 1
    data = {"latents": torch.randn(batch, 4, lat, lat, device=device),
            "conditioning": Conditioning(class_map, crops, torch.tensor([[1, 2, 0]] * batch, device=device))}
    return model, optimizer, DDPMScheduler.from_config(SCHEDULER), data, config


def our_step(shape: dict, batch: int, device: str, compile_: bool):
    from htd_toolkit.models.training import step_generator, training_loss

    model, optimizer, scheduler, data, config = build_training(shape, batch, device)
    forward = torch.compile(model) if compile_ else model
    counter = iter(range(10**9))

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = training_loss(forward, scheduler, data, step_generator(0, next(counter)), config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(shape_name: str, batch: int, compile_: bool, reps: int, plain_row: dict | None = None) -> dict:
    """Plain then ours; `plain_row`, an earlier row of this run at the same batch, spares timing plain again."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES[shape_name]
    if plain_row is None:
        plain = timeit(plain_step(shape, batch, device), device, warm=2, reps=reps)
    else:
        plain = batch / plain_row["plain_samples_per_s"]
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ours_fn = our_step(shape, batch, device, compile_)
    ours_fn()
    sync(device)
    first = time.perf_counter() - start
    ours = timeit(ours_fn, device, warm=2, reps=reps)
    row = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "shape": shape_name, "batch": batch,
           "plain_samples_per_s": batch / plain, "ours_samples_per_s": batch / ours, "ratio": plain / ours,
           "ours_first_step_s": first, "compiled": compile_}
    if device == "cuda":
        row["ours_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="toy")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (compile time reported)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    row = run(args.shape, args.batch, args.compile, args.reps)
    print(json.dumps(row))
    print(f"plain diffusers-style step : {row['plain_samples_per_s']:8.2f} samples/s")
    print(f"htd-toolkit recipe step    : {row['ours_samples_per_s']:8.2f} samples/s (with the crop adapter)")
    print(f"ratio                      : {row['ratio']:8.2f}x")


if __name__ == "__main__":
    main()
