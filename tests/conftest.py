"""Shared fixtures: tiny timm ViTs (32 px, patch 8, 4 blocks) of every supported family."""

from __future__ import annotations

import pytest
import timm
import torch

#: Small enough that a forward pass takes milliseconds on 2 cores.
TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3, num_classes=10)

#: Every architecture family ltmp_core promises to patch: (timm name, extra kwargs).
ARCHITECTURES = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "deit3_small": ("deit3_small_patch16_224", {"init_values": 0.1}),  # LayerScale, no_embed_class
    "reg4_dinov2": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.1}),  # 4 register tokens
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "avg_pool": ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
}


def tiny_model(arch: str = "deit_small", *, fused: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of ``arch`` in eval mode."""
    name, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY, **extra, **overrides}).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def images(n: int = 6, seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param
