"""The crop adapter: raw tissue crops → tokens → decoupled cross-attention restricted to each crop's region.

- `CropEncoder` turns the frozen VAE latents of a crop into one embedding: `adapter` mode keeps the
  latent grid (raw morphology) through a small trainable conv + linear head; `embedding` mode pools the
  latents to per-channel statistics first (the paper's "abstract embedding" baseline).
- The embedding becomes 4 tokens through diffusers' `ImageProjection` inside `unet.encoder_hid_proj`,
  and reaches the UNet through IP-Adapter `to_k_ip` / `to_v_ip` projections, so the weights are saved
  in the IP-Adapter format that `load_ip_adapter` reads.
- `RegionMaskedCropAttnProcessor` replaces the stock IP-Adapter processor (same parameters, same file
  format): one product against all crops' tokens, a softmax per crop, each crop's output weighted by
  the area its region covers in every attention cell (the stock bicubic
  downsample overshoots [0, 1] and loses small regions), masks of a CFG-doubled batch handled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import IPAdapterMixin
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

TOKENS_PER_CROP = 4  # what the stock loader builds for `proj.weight`-style projections


class CropEncoder(ModelMixin, ConfigMixin):
    """VAE latents of a crop (N, C, s, s) → an embedding (N, embed_dim)."""

    @register_to_config
    def __init__(self, mode: str = "adapter", latent_channels: int = 4, crop_size: int = 64, embed_dim: int = 256,
                 hidden_channels: int = 64, vae_scale_factor: int = 8):
        super().__init__()
        if mode not in ("adapter", "embedding"):
            raise ValueError(f"CropEncoder mode must be adapter or embedding, got {mode!r}")
        side = crop_size // vae_scale_factor
        if mode == "adapter":
            self.body = nn.Sequential(
                nn.Conv2d(latent_channels, hidden_channels, 3, padding=1), nn.SiLU(),
                nn.Conv2d(hidden_channels, hidden_channels, 3, stride=2, padding=1), nn.SiLU(),
                nn.Flatten(), nn.Linear(hidden_channels * math.ceil(side / 2) ** 2, embed_dim))
        else:
            self.body = nn.Sequential(nn.Linear(2 * latent_channels, hidden_channels), nn.SiLU(),
                                      nn.Linear(hidden_channels, embed_dim))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "embedding":
            latents = torch.cat([latents.mean(dim=(2, 3)), latents.std(dim=(2, 3))], dim=1)
        return self.body(latents)


class CropAdapter(ModelMixin, ConfigMixin):
    """The crop adapter as one pipeline component (`HTDPipeline.crop_adapter`): the crop encoder, the projection of
    its embedding to tokens and each cross-attention layer's `to_k_ip` / `to_v_ip`. `install` puts the last two
    into a UNet (shared, not copied) with the region-masked processor, as `load_ip_adapter` would; a saved UNet
    never holds them (`HTDPipeline.save_pretrained`), so it stays a stock `UNet2DConditionModel`."""

    @register_to_config
    def __init__(self, mode: str = "adapter", latent_channels: int = 4, crop_size: int = 64, embed_dim: int = 256,
                 hidden_channels: int = 64, vae_scale_factor: int = 8, cross_attention_dim: int = 768,
                 hidden_sizes: tuple[int, ...] = (), tokens: int = TOKENS_PER_CROP):
        super().__init__()
        self.encoder = CropEncoder(mode, latent_channels, crop_size, embed_dim, hidden_channels, vae_scale_factor)
        self.image_projection = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=cross_attention_dim,
                                                num_image_text_embeds=tokens)
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_attention_dim, size, bias=False) for size in hidden_sizes)
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_attention_dim, size, bias=False) for size in hidden_sizes)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents of crops (N, C, s, s) → embeddings (N, embed_dim), as `CropEncoder`."""
        return self.encoder(latents)

    @classmethod
    def from_unet(cls, unet, encoder: CropEncoder) -> CropAdapter:
        """The adapter a UNet carries (installed by `install_crop_adapter` or `load_ip_adapter`) with its crop
        encoder, sharing their modules."""
        layers = [unet.attn_processors[name] for _, name in cross_attention_layers(unet)]
        adapter = cls(**{k: v for k, v in encoder.config.items() if not k.startswith("_")},
                      cross_attention_dim=unet.config.cross_attention_dim, hidden_sizes=(), tokens=layers[0].num_tokens[0])
        adapter.register_to_config(hidden_sizes=[proc.hidden_size for proc in layers])
        adapter.encoder = encoder
        adapter.image_projection = unet.encoder_hid_proj.image_projection_layers[0]
        adapter.to_k_ip = nn.ModuleList(proc.to_k_ip[0] for proc in layers)
        adapter.to_v_ip = nn.ModuleList(proc.to_v_ip[0] for proc in layers)
        return adapter

    def installed_in(self, unet) -> bool:
        projection = getattr(unet, "encoder_hid_proj", None)
        return projection is not None and any(layer is self.image_projection
                                              for layer in getattr(projection, "image_projection_layers", ()))

    def install(self, unet) -> None:
        """Route `unet`'s cross-attention through this adapter's projections (region-masked), as
        `load_ip_adapter` installs an IP-Adapter; nothing when it is installed already."""
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        if self.installed_in(unet):
            return
        layers = cross_attention_layers(unet)
        if len(layers) != len(self.to_k_ip):
            raise ValueError(f"the crop adapter has {len(self.to_k_ip)} cross-attention layers, the UNet {len(layers)}")
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.image_projection])
        unet.config.encoder_hid_dim_type = "ip_image_proj"  # what `load_ip_adapter` sets: the UNet reads it
        processors = dict(unet.attn_processors)
        for index, (_, name) in enumerate(layers):
            proc = RegionMaskedCropAttnProcessor(self.to_k_ip[index].out_features, self.config.cross_attention_dim,
                                                 [self.config.tokens], [1.0])
            proc.to_k_ip, proc.to_v_ip = nn.ModuleList([self.to_k_ip[index]]), nn.ModuleList([self.to_v_ip[index]])
            processors[name] = proc
        unet.set_attn_processor(processors)


def cross_attention_layers(unet) -> list[tuple[int, str]]:
    """(index in `unet.attn_processors`, name) of every cross-attention (attn2) layer, the IP-Adapter key order."""
    return [(i, name) for i, name in enumerate(unet.attn_processors) if name.endswith("attn2.processor")]


def initial_ip_state_dict(unet, embed_dim: int) -> dict:
    """An IP-Adapter-format state dict: a fresh projection, to_k_ip/to_v_ip copied from each layer's to_k/to_v."""
    proj = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=unet.config.cross_attention_dim,
                           num_image_text_embeds=TOKENS_PER_CROP)
    ip = {}
    for index, name in cross_attention_layers(unet):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        ip[f"{index}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        ip[f"{index}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    image_proj = {k.replace("image_embeds", "proj"): v for k, v in proj.state_dict().items()}
    return {"image_proj": image_proj, "ip_adapter": ip}


class UNetHost(IPAdapterMixin):
    """The one attribute diffusers' public IP-Adapter loader reads (`unet`): a bare UNet takes an in-memory
    IP-Adapter state dict through `load_ip_adapter`, not through the UNet's private loading method."""

    def __init__(self, unet):
        self.unet = unet


def install_crop_adapter(unet, state_dict: dict) -> None:
    """Load an IP-Adapter-format state dict into `unet` with diffusers' `load_ip_adapter`, then the masked
    processor."""
    UNetHost(unet).load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None,
                                   low_cpu_mem_usage=False)
    use_region_masked_processors(unet)


def use_region_masked_processors(unet) -> None:
    """Swap every stock IP-Adapter processor for the region-masked one, keeping its weights."""
    processors = {}
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, IPAdapterAttnProcessor2_0) and not isinstance(proc, RegionMaskedCropAttnProcessor):
            masked = RegionMaskedCropAttnProcessor(proc.hidden_size, proc.cross_attention_dim, proc.num_tokens,
                                                   proc.scale)
            masked.to_k_ip, masked.to_v_ip = proc.to_k_ip, proc.to_v_ip
            proc = masked
        processors[name] = proc
    unet.set_attn_processor(dict(processors))


def export_ip_state_dict(unet) -> dict[str, torch.Tensor]:
    """The crop adapter's weights as a flat IP-Adapter safetensors dict (`image_proj.*`, `ip_adapter.*`)."""
    flat = {}
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    for key, value in projection.state_dict().items():
        flat[f"image_proj.{key.replace('image_embeds', 'proj')}"] = value.detach().contiguous()
    processors = unet.attn_processors
    for index, name in cross_attention_layers(unet):
        proc = processors[name]
        flat[f"ip_adapter.{index}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().contiguous()
        flat[f"ip_adapter.{index}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().contiguous()
    return flat


def region_weights(masks: torch.Tensor, length: int, batch: int) -> torch.Tensor:
    """(Bm, n, H, W) masks → (batch, n, length) area coverage of each attention cell, in [0, 1]."""
    height, width = masks.shape[-2:]
    rows = max(1, round(math.sqrt(length * height / width)))
    weights = F.adaptive_avg_pool2d(masks.float(), (rows, length // rows)).flatten(2)
    if weights.shape[0] != batch:
        if batch % weights.shape[0]:
            raise ValueError(f"crop masks for {weights.shape[0]} samples cannot serve a batch of {batch}")
        weights = weights.repeat(batch // weights.shape[0], 1, 1)
    return weights


class RegionMaskedCropAttnProcessor(IPAdapterAttnProcessor2_0):
    """Text cross-attention plus, for each crop, attention to its tokens weighted by its region's coverage."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("the crop adapter expects (text states, [crop tokens]) as encoder_hidden_states")
        text_states, ip_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        heads, head_dim = attn.heads, query.shape[-1] // attn.heads
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = attn.to_k(text_states).view(batch, -1, heads, head_dim).transpose(1, 2)
        v = attn.to_v(text_states).view(batch, -1, heads, head_dim).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        masks = ip_adapter_masks[0] if ip_adapter_masks else None
        if masks is not None and self.scale[0] != 0:
            out = out + self.scale[0] * self._crop_attention(q, ip_states[0], masks)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _crop_attention(self, q: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """q (B, h, L, d), tokens (B, n, t, D), masks (Bm, n, H, W) → (B, h, L, d).

        Each crop has its own softmax over its t tokens, weighted by its region's coverage of the cell:
        sum_c w_c softmax(q k_c) v_c = (softmax per crop ⊙ w) @ [v_1 .. v_n]. One product against all
        n·t tokens instead of one attention per crop over n copies of q (the memory-bound part).
        """
        batch, heads, length, head_dim = q.shape
        n, t = tokens.shape[1:3]

        def split(x):  # (B, n, t, h*d) → (B, h, n*t, d)
            return x.view(batch, n * t, heads, head_dim).transpose(1, 2)

        k, v = split(self.to_k_ip[0](tokens)), split(self.to_v_ip[0](tokens))
        scores = (q @ k.transpose(-1, -2)).view(batch, heads, length, n, t).float() * head_dim**-0.5
        weights = region_weights(masks, length, batch).transpose(1, 2)  # (B, L, n)
        probs = scores.softmax(dim=-1) * weights[:, None, :, :, None]
        return probs.flatten(3).to(v.dtype) @ v
