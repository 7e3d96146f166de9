"""The HTD model: LoRA on a Stable Diffusion UNet, a semantic-map ControlNet and a crop adapter.

- `conditioning`: one-hot maps, crop slots and region masks, the crop canvas.
- `crop_adapter`: the crop encoder and the region-masked decoupled cross-attention.
- `htd`: `HTDConfig` (htd_config.json) and `HTDModel` (build from a base, train, save, load).
- `pipeline`: `HTDPipeline`, generation from a model folder or Hub repo.
"""

CROP_MODES = ("adapter", "canvas", "embedding", "none")
