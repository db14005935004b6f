"""``forward_intermediates(output_fmt='NCHW')`` of a reducing plan: feature maps of the stock shape,
each patch position holding the token that holds its patch (issue 27)."""

from __future__ import annotations

import pytest
import torch

import ltmp_core
from ltmp_core import PRUNED
from tests.conftest import images, tiny_model

OPS = ["merge+prune", "squeeze", "merge", "prune"]


def patched(arch: str, mode: str, op=OPS, keep=(0.75, 0.7, 0.8, 0.6)) -> torch.nn.Module:
    model = tiny_model(arch)
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=list(op) if isinstance(op, list) else op,
                                                     keep=list(keep)), mode="static")
    ltmp_core.calibrate(model, images(8))
    return ltmp_core.set_mode(model, mode)


@pytest.mark.parametrize("arch", ["deit_small", "reg4_dinov2", "avg_pool"])
@pytest.mark.parametrize("mode", ["soft", "dynamic", "static"])
def test_an_identity_plan_gives_stock_intermediates(arch, mode):
    model = tiny_model(arch)
    x = images(3)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 2, 3], return_prefix_tokens=True)
        ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="none"), mode=mode)
        got = model.forward_intermediates(x, indices=[0, 2, 3], return_prefix_tokens=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_reduced_tokens_go_back_to_the_patches_they_hold(mode):
    model = patched("deit_small", mode)
    x = images(3, seed=4)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        trace = ltmp_core.trace_tokens(model, x)
    stock = tiny_model("deit_small").forward_intermediates(x)[1]
    assert [m.shape for m in maps] == [s.shape for s in stock] == [(3, 48, 4, 4)] * 4
    assert final.shape[1] < 17  # the final features stay reduced
    for block, (dense, seq) in enumerate(zip(maps, tokens)):
        owner, fate = trace.owner[block], trace.fate[block]  # [B, 16]: token position after the block
        flat = dense.flatten(2).transpose(1, 2)  # [B, 16, C] in patch order
        for b in range(3):
            for patch in range(16):
                if owner[b, patch] < 0:
                    assert fate[b, patch] == PRUNED
                    assert flat[b, patch].abs().max() == 0  # pruned: zeros
                else:  # the token that holds the patch, as the reduced model computed it
                    torch.testing.assert_close(flat[b, patch], seq[b, owner[b, patch] - 1], rtol=1e-5, atol=1e-5)
    held = trace.owner[-1][0][trace.owner[-1][0] >= 0]
    assert len(held.unique()) < len(held) and (trace.fate[-1] == PRUNED).any()  # merged and pruned patches


def test_output_dict_and_prefix_tokens_are_kept():
    model = patched("reg4_dinov2", "static")
    x = images(2)
    with torch.no_grad():
        out = model.forward_intermediates(x, indices=2, output_dict=True, return_prefix_tokens=True)
    assert [t.shape for t in out["image_intermediates"]] == [(2, 48, 4, 4)] * 2
    assert [t.shape for t in out["image_intermediates_prefix"]] == [(2, 5, 48)] * 2
    assert out["image_features"].shape[1] < 21


@pytest.mark.parametrize("family", ["eva02", "dinov3", "beit", "relpos_clsgap", "siglip_map"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_feature_maps_of_the_other_families_have_the_stock_shape(family, mode):
    from tests.ltmp_core.test_families import calibrated, family_model

    model = calibrated(family, mode)
    x = images(2, seed=6)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        tokens = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
        stock = family_model(family).forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [m.shape for m in maps] == [s.shape for s in stock]
    assert tokens[-1].shape[1] < stock[-1].shape[-1] * stock[-1].shape[-2]  # NLC stays reduced
