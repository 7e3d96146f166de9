import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from htd_toolkit.testing import tiny_base as tiny_base_module


def _generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("tissue", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_stock_pipeline_loads_and_generates(tiny_base):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    assert pipe.vae_scale_factor == 8
    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    assert _generate(pipe).shape == (1, 64, 64, 3)


def test_reload_is_exact_and_the_seed_fixes_the_weights(tiny_base):
    reference = tiny_base_module.build_tiny_pipeline("min", seed=0).unet.state_dict()
    reloaded = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").state_dict()
    assert reference.keys() == reloaded.keys()
    for name in reference:
        assert torch.equal(reference[name], reloaded[name]), name


def test_controlnet_pipeline_with_one_hot_map(tiny_base, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    tiny_base_module.tiny_controlnet(pipe.unet, conditioning_channels=5).save_pretrained(tmp_path / "cn")
    cpipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_base, controlnet=ControlNetModel.from_pretrained(tmp_path / "cn"), safety_checker=None)
    labels = torch.randint(0, 5, (64, 64))
    one_hot = torch.nn.functional.one_hot(labels, 5).permute(2, 0, 1)[None].float()
    image = _generate(cpipe, image=one_hot)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_cli_writes_sd15_layout_and_refuses_non_empty(tmp_path, capsys):
    out = tmp_path / "sd15"
    assert tiny_base_module.main(["--out", str(out), "--layout", "sd15"]) == 0
    assert {p.name for p in out.iterdir()} >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                "model_index.json"}
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    cross_attention = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(cross_attention) == 10  # 3 down + 1 mid + 6 up at one layer per block (SD1.5: 16 at two)
    capsys.readouterr()
    assert tiny_base_module.main(["--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert tiny_base_module.main(["--out", str(out), "--overwrite"]) == 0
    assert UNet2DConditionModel.from_pretrained(out, subfolder="unet").config.block_out_channels == [8, 16]


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown layout"):
        tiny_base_module.build_tiny_pipeline("sdxl")
