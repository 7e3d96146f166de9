"""The region-masked crop processor against stock diffusers' IP-Adapter processor and a per-crop reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from htd_toolkit.models.crop_adapter import RegionMaskedCropAttnProcessor

HEADS, HEAD_DIM, CROSS, TOKENS = 2, 8, 24, 4


def layer_and_processors(scale: float = 0.7):
    torch.manual_seed(0)
    attn = Attention(query_dim=HEADS * HEAD_DIM, cross_attention_dim=CROSS, heads=HEADS, dim_head=HEAD_DIM)
    stock = IPAdapterAttnProcessor2_0(HEADS * HEAD_DIM, CROSS, num_tokens=(TOKENS,), scale=scale)
    ours = RegionMaskedCropAttnProcessor(HEADS * HEAD_DIM, CROSS, (TOKENS,), scale)
    ours.to_k_ip, ours.to_v_ip = stock.to_k_ip, stock.to_v_ip
    return attn, stock, ours


def inputs(batch: int, n: int, side: int):
    hidden = torch.randn(batch, side * side, HEADS * HEAD_DIM)
    text = torch.randn(batch, 5, CROSS)
    tokens = torch.randn(batch, n, TOKENS, CROSS)
    return hidden, text, tokens


def test_matches_the_stock_processor_on_masks_at_the_attention_grid():
    """Binary masks already at the attention grid: the stock bicubic resize is the identity there."""
    attn, stock, ours = layer_and_processors()
    hidden, text, tokens = inputs(batch=2, n=3, side=4)
    labels = torch.randint(0, 3, (2, 4, 4))
    masks = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = stock(attn, hidden, (text, [tokens]), ip_adapter_masks=[masks])
        got = ours(attn, hidden, (text, [tokens]), ip_adapter_masks=[masks])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_each_crop_is_its_own_softmax_weighted_by_region_coverage():
    """Fine masks pooled to a coarse grid: per cell, crop c adds coverage_c · softmax(q k_c) v_c, CFG-doubled batch."""
    attn, _, ours = layer_and_processors(scale=1.0)
    batch, n, side = 4, 3, 4
    hidden, text, tokens = inputs(batch, n, side)
    masks = torch.rand(batch // 2, n, 16, 16).round()  # one mask set per sample, served to both CFG halves
    with torch.no_grad():
        got = ours(attn, hidden, (text, [tokens]), ip_adapter_masks=[masks])

        def heads(x):
            return x.view(x.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)

        q = heads(attn.to_q(hidden))
        out = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        coverage = F.avg_pool2d(masks, 4).flatten(2).repeat(2, 1, 1)  # (batch, n, cells): area fractions
        for c in range(n):
            k, v = heads(ours.to_k_ip[0](tokens[:, c])), heads(ours.to_v_ip[0](tokens[:, c]))
            out = out + F.scaled_dot_product_attention(q, k, v) * coverage[:, c, None, :, None]
        expected = attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, HEADS * HEAD_DIM))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_crop_changes_nothing_outside_its_region():
    attn, _, ours = layer_and_processors()
    hidden, text, tokens = inputs(batch=1, n=2, side=4)
    masks = torch.zeros(1, 2, 4, 4)
    masks[:, 0, :2], masks[:, 1, 2:] = 1, 1
    changed = tokens.clone()
    changed[:, 0] += 1.0
    with torch.no_grad():
        before = ours(attn, hidden, (text, [tokens]), ip_adapter_masks=[masks]).view(4, 4, -1)
        after = ours(attn, hidden, (text, [changed]), ip_adapter_masks=[masks]).view(4, 4, -1)
    assert torch.equal(before[2:], after[2:])
    assert not torch.allclose(before[:2], after[:2])


def test_the_adapter_is_installed_through_diffusers_public_loader(monkeypatch):
    """`install_crop_adapter` goes through `IPAdapterMixin.load_ip_adapter` (no private UNet method is
    called by the toolkit), and the UNet then carries the region-masked processors."""
    from pathlib import Path

    from diffusers.loaders import IPAdapterMixin

    from htd_toolkit.models.crop_adapter import (
        RegionMaskedCropAttnProcessor,
        initial_ip_state_dict,
        install_crop_adapter,
    )
    from htd_toolkit.testing.tiny_base import build_tiny_pipeline

    calls = []
    real = IPAdapterMixin.load_ip_adapter
    monkeypatch.setattr(IPAdapterMixin, "load_ip_adapter", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    unet = build_tiny_pipeline("sd15").unet
    install_crop_adapter(unet, initial_ip_state_dict(unet, 32))
    assert len(calls) == 1
    assert any(isinstance(p, RegionMaskedCropAttnProcessor) for p in unet.attn_processors.values())
    package = Path(__file__).resolve().parents[1] / "htd_toolkit"
    assert not [p for p in package.rglob("*.py") if "._load_ip_adapter_weights" in p.read_text()]
