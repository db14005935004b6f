"""The FLOP reference itself, against hand-computed counts: a torch release that stops counting an
op fails here, loudly, instead of shifting every comparison that uses the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block

from tests.flop_reference import counted_macs, versions

N, C, H = 17, 48, 3  # tokens, width, heads


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_reference_counts_the_attention_of_a_stock_timm_attention(fused):
    attn = Attention(C, num_heads=H, qkv_bias=True).eval()
    attn.fused_attn = fused
    # qkv: 17 * 48 * 144 = 117504; q @ k^T: 17 * 17 * 48 = 13872; attn @ v: 13872; proj: 17 * 48 * 48 = 39168.
    expected = 117504 + 13872 + 13872 + 39168
    assert counted_macs(attn, torch.randn(2, N, C)) == 2 * expected, versions()


def test_reference_counts_a_fused_timm_block_as_its_unfused_twin():
    block = Block(C, num_heads=H, mlp_ratio=2.0).eval()
    x = torch.randn(1, N, C)
    block.attn.fused_attn = True
    fused = counted_macs(block, x)
    block.attn.fused_attn = False
    # MLP: 17 * (48 * 96 + 96 * 48) = 156672 on top of the attention's 184416.
    assert fused == counted_macs(block, x) == 184416 + 156672, versions()


def test_reference_counts_sdpa_with_a_mask_and_unequal_lengths():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    mask = torch.zeros(2, 1, 5, 7)

    class Sdpa(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    # 2 * 3 * 5 * 7 * (8 + 4) MACs
    assert counted_macs(Sdpa(), q) == 2520, versions()
