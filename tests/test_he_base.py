"""`htd-toolkit pretrain-base` and the H&E base shipped in the package."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli


def weights(folder):
    return {**load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
            **{f"vae.{k}": v for k, v in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items()}}


def pretrain_args(slide, out, steps="4"):
    return ["pretrain-base", "--slides", str(slide), "--out", str(out), "--steps", steps, "--vae-steps", "2",
            "--patches", "48", "--seed", "3"]


def test_pretrain_base_writes_a_stock_loadable_base_and_resumes_exactly(sample_slide, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from htd_toolkit.base import pretrain as he_base

    code, out, err = run_cli(pretrain_args(sample_slide, tmp_path / "whole"), capsys)
    assert code == 0, err
    assert "VAE PSNR on 64 held-out patches" in err and out.strip() == str(tmp_path / "whole")
    report = json.loads((tmp_path / "whole" / "pretrain_report.json").read_text())
    assert report["vae_steps"] == 2 and report["unet_steps"] == 4 and report["vae_psnr_held_out_db"] > 5
    assert (tmp_path / "whole" / "assets" / "sample_grid.png").exists()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "whole", safety_checker=None)
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.scaling_factor == pytest.approx(report["latent_scaling_factor"],
                                                                                          rel=1e-4)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size

    # interrupted after two UNet steps (a checkpoint at every step), then the same command again
    class Killed(Exception):
        pass

    real_loss = he_base.unet_loss_fn

    def interrupted(*args, **kwargs):
        inner = real_loss(*args, **kwargs)

        def loss(step):
            if step == 2:
                raise Killed
            return inner(step)
        return loss

    monkeypatch.setattr(he_base.Stage.run, "__defaults__", (None, 0.0))
    monkeypatch.setattr(he_base, "unet_loss_fn", interrupted)
    with pytest.raises(Killed):
        run_cli(pretrain_args(sample_slide, tmp_path / "resumed"), capsys)
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    monkeypatch.setattr(he_base, "unet_loss_fn", real_loss)
    code, _, err = run_cli(pretrain_args(sample_slide, tmp_path / "resumed"), capsys)
    assert code == 0, err
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # the VAE stage was resumed complete: its loss comes from the saved state, and the report is strict JSON
    def no_nan(constant):
        raise AssertionError(f"{constant} in pretrain_report.json")

    resumed_report = json.loads((tmp_path / "resumed" / "pretrain_report.json").read_text(), parse_constant=no_nan)
    assert resumed_report["vae_final_loss"] == report["vae_final_loss"]


@pytest.mark.parametrize("flag, value, message", [
    ("--patch-size", "40", "a multiple of 16"), ("--mpp", "nan", "between 0.05 and 50"),
    ("--minutes", "-1", "positive"), ("--holdout-fraction", "1.5", "in (0, 1)")])
def test_pretrain_base_refuses_bad_values_in_one_line(sample_slide, tmp_path, capsys, flag, value, message):
    code, _, err = run_cli([*pretrain_args(sample_slide, tmp_path / "out"), flag, value], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_pretrain_base_refuses_a_folder_holding_other_files(sample_slide, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = run_cli(pretrain_args(sample_slide, tmp_path / "out"), capsys)
    assert code == 1 and "notes.txt" in err and "--overwrite" in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


class Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pretrain_base_resumes_no_pickled_code_from_its_state_folder(sample_slide, tmp_path, capsys):
    from htd_toolkit.base.pretrain import PretrainOptions, check_out

    out, marker = tmp_path / "out", tmp_path / "ran"
    check_out(PretrainOptions(slides=[sample_slide], out=out, unet_steps=4, vae_steps=2, patches=48, seed=3))
    torch.save({"model": Planted(marker)}, out / ".work" / "vae.pt")
    code, _, err = run_cli(pretrain_args(sample_slide, out), capsys)
    assert code == 1 and "vae.pt: not a pretrain-base state" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_the_shipped_base_makes_h_and_e_coloured_patches(sample_slide):
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    from htd_toolkit.base.pretrain import PretrainOptions, read_patches
    from htd_toolkit.base.shipped import shipped_base

    # fp16 on disk (7.8 MB); CPUs compute in fp32
    pipe = StableDiffusionPipeline.from_pretrained(shipped_base(), safety_checker=None, torch_dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([""] * 8, num_inference_steps=20, guidance_scale=1.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (8, 64, 64, 3)
    real = read_patches(PretrainOptions(slides=[sample_slide], out=None, patches=600), holdout=False) / 255.0
    generated_mean, real_mean = images.reshape(-1, 3).mean(0), real.reshape(-1, 3).mean(0)
    # 16 samples were 0.036 off the training patches with this sampler (docs/fidelity.md); a random base: 0.21
    assert np.abs(generated_mean - real_mean).max() < 0.08, (generated_mean, real_mean)
    assert generated_mean.argmin() == 1  # eosin/haematoxylin purple: green the lowest channel
    assert images.std(axis=(1, 2)).mean() > 0.05  # texture, not flat colour


def test_whitening_the_latents_leaves_the_autoencoder_unchanged_and_centres_its_latents():
    from diffusers import AutoencoderKL

    from htd_toolkit.base.pretrain import VAE, encode_latents, whiten_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([2.0, -1.5, 0.5, 0.0])  # uncentred, as trained VAEs are
    images = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    means, stds = encode_latents(vae, images)
    decoded = vae.decode(means).sample
    new_means, new_stds = whiten_latents(vae, means, stds)
    again, again_stds = encode_latents(vae, images)
    torch.testing.assert_close(again, new_means, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again_stds, new_stds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(again.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(vae.decode(again).sample, decoded, atol=1e-4, rtol=1e-4)
    assert vae.config.scaling_factor == 1.0
