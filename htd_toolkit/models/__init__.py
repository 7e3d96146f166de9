"""The HTD model: LoRA on a Stable Diffusion UNet, a semantic-map ControlNet and a crop adapter.

- `conditioning`: one-hot maps, crop slots and region masks, the crop canvas.
- `crop_adapter`: the crop encoder and the region-masked decoupled cross-attention.
- `htd`: `HTDConfig` (htd_config.json) and `HTDModel` (build from a base, train, save, load).
- `pipeline`: `HTDPipeline`, generation from a model folder or Hub repo.
"""

CROP_MODES = ("adapter", "canvas", "embedding", "none")

# Generation settings as the pipeline names them: its defaults, which `generate`, `generate-slide` and the
# recipe's validation take too, and their one range check.
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 2.0
MAX_GUIDANCE_SCALE = 100.0


def check_generation_settings(num_inference_steps, guidance_scale,
                              names: tuple[str, str] = ("num_inference_steps", "guidance_scale")) -> None:
    """One line (an `InputError`, which is a ValueError as diffusers raises) unless the steps are a whole number
    >= 1 and the guidance a finite number in [0, MAX_GUIDANCE_SCALE]; `names` as the caller's user spells them."""
    from htd_toolkit.errors import InputError, UserError, check_number

    try:
        check_number(names[0], num_inference_steps, 1, whole=True)
        check_number(names[1], guidance_scale, 0, MAX_GUIDANCE_SCALE)
    except UserError as err:
        raise InputError(str(err)) from None
