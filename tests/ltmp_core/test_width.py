"""Width cuts through torch-pruning: against stock timm with the cut heads and units zeroed, against
PyTorch's FLOP counter, and the patch of a width-cut model for tokens."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import ltmp_core
from ltmp_core import LTMPError
from tests.conftest import ARCHITECTURES, counted_macs, images, tiny_model

# The tiny models have 3 heads of 16 channels and 192 MLP units in each of 4 blocks.
HEADS = [2, 1, 3, 2]
UNITS = [100, 192, 50, 7]


def width_plan(model, op="none", keep=1.0, **kwargs):
    return ltmp_core.make_plan(model, op=op, keep=keep, heads=HEADS, mlp_hidden=UNITS, **kwargs)


def kept_columns(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which columns of ``before`` survive in ``after`` (found by value, not from the code under test)."""
    out = []
    for j in range(after.shape[1]):
        match = [i for i in range(before.shape[1]) if torch.equal(before[:, i], after[:, j])]
        assert len(match) == 1
        out.append(match[0])
    return out


def zeroed_reference(stock: torch.nn.Module, cut: torch.nn.Module) -> torch.nn.Module:
    """The stock model with every head and MLP unit that ``cut`` lost contributing nothing: those
    columns of the attention projection and of the MLP's second linear set to zero."""
    ref = copy.deepcopy(stock)
    with torch.no_grad():
        for b_ref, b_cut in zip(ref.blocks, cut.blocks):
            for name in ("attn.proj", "mlp.fc2"):
                full = b_ref.get_submodule(name).weight
                keep = set(kept_columns(full, b_cut.get_submodule(name).weight))
                full[:, [i for i in range(full.shape[1]) if i not in keep]] = 0
    return ref


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_a_cut_model_is_stock_timm_without_the_cut_heads_and_units(arch, fused):
    stock = tiny_model(arch, fused=fused)
    x = images(4)
    model = ltmp_core.prune_width(copy.deepcopy(stock), width_plan(stock), x)
    assert isinstance(model, VisionTransformer) and ltmp_core.block_widths(model) == list(zip(HEADS, UNITS))
    for b_stock, b_cut, heads in zip(stock.blocks, model.blocks, HEADS):
        assert b_cut.attn.qkv.out_features == 3 * 16 * heads and b_cut.attn.proj.in_features == 16 * heads
        # Whole heads: the projection keeps whole runs of 16 columns, each starting at a head's first.
        cols = kept_columns(b_stock.attn.proj.weight, b_cut.attn.proj.weight)
        assert all(cols[i] % 16 == 0 and cols[i:i + 16] == list(range(cols[i], cols[i] + 16))
                   for i in range(0, len(cols), 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed_reference(stock, model)(x), rtol=1e-5, atol=1e-5)
    # The geometry is the model's before the cut, so FLOPs ratios stay ratios of the unreduced model.
    assert ltmp_core.ViTGeometry.from_model(model) == ltmp_core.ViTGeometry.from_model(stock)
    assert ltmp_core.ViTGeometry.from_model(copy.deepcopy(model)) == ltmp_core.ViTGeometry.from_model(stock)


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_the_head_and_units_that_contribute_nothing_are_cut_first(importance):
    """Head 1 of every block and the first 92 MLP units feed nothing forward (their projection
    columns are zero): both criteria must cut exactly them."""
    model = tiny_model("deit_small")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight[:, 16:32] = 0
            block.attn.qkv.weight.view(3, 3, 16, 48)[:, 1] *= 1e-3  # and (magnitude) small weights
            block.mlp.fc2.weight[:, :92] = 0
            block.mlp.fc1.weight[:92] *= 1e-3
    stock = copy.deepcopy(model)
    plan = ltmp_core.make_plan(model, op="none", heads=2, mlp_hidden=100)
    ltmp_core.prune_width(model, plan, images(8) if importance == "taylor" else None, importance=importance)
    for b_stock, b_cut in zip(stock.blocks, model.blocks):
        assert kept_columns(b_stock.attn.proj.weight, b_cut.attn.proj.weight) == list(range(16)) + list(range(32, 48))
        assert kept_columns(b_stock.mlp.fc2.weight, b_cut.mlp.fc2.weight) == list(range(92, 192))


def test_taylor_ranks_by_the_loss_on_the_labels_given():
    """With labels, the Taylor criterion scores against them; with none, against the model's own
    predictions. Both are deterministic for the same images."""
    stock = tiny_model("deit_small")
    x = images(16)
    plan = ltmp_core.make_plan(stock, op="none", heads=2, mlp_hidden=96)
    a = ltmp_core.prune_width(copy.deepcopy(stock), plan, x)
    b = ltmp_core.prune_width(copy.deepcopy(stock), plan, x)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    own = stock(x).argmax(dim=-1)
    c = ltmp_core.prune_width(copy.deepcopy(stock), plan, x, labels=own)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("arch", ["deit_small", "deit_small_distilled", "reg4_dinov2", "avg_pool", "qk_norm"])
def test_flops_of_cut_models_match_pytorch_counter_stock_static_and_dynamic(arch, monkeypatch):
    x = images(6)
    stock = tiny_model(arch)
    model = ltmp_core.prune_width(copy.deepcopy(stock), width_plan(stock), x)
    # Stock timm at the cut widths: exactly the counter's figure.
    assert ltmp_core.count_flops(model) == counted_macs(model, x[:1])
    plan = width_plan(stock, op=["merge", "merge+prune", "squeeze", "prune"], keep=[0.7, 0.6, 0.8, 0.5])
    ltmp_core.apply_plan(model, plan, mode="static")
    # Static mode's fast forms and, without them, the masked reducers: each counted as it runs.
    assert ltmp_core.count_flops(model) == pytest.approx(counted_macs(model, x[:1]), rel=1e-3)
    for name, stage in list(ltmp_core.REDUCERS.items()):
        monkeypatch.setitem(ltmp_core.REDUCERS, name, dataclasses.replace(stage, static=None))
    ltmp_core.apply_plan(model, plan, mode="static")
    assert ltmp_core.count_flops(model) == pytest.approx(counted_macs(model, x[:1]), rel=1e-3)
    monkeypatch.undo()
    ltmp_core.calibrate(model, x)
    ltmp_core.set_mode(model, "dynamic")
    for i in range(3):  # each image alone: the counter sees what it costs
        mean, _ = ltmp_core.measure_flops(model, [x[i:i + 1]])
        assert mean == pytest.approx(counted_macs(model, x[i:i + 1]), rel=1e-3)


def test_a_full_size_deit_small_cut_for_width_and_tokens_matches_the_counter():
    torch.manual_seed(0)
    stock = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    heads, units = [6, 4, 4, 3, 6, 5, 2, 6, 1, 6, 3, 6], [1536, 768, 1024, 384, 1536, 200, 1536, 96, 1536, 700, 1536, 48]
    plan = ltmp_core.make_plan(stock, op=["none", "merge+prune"] * 6, keep=0.8, heads=heads, mlp_hidden=units)
    model = ltmp_core.prune_width(stock, plan)
    x = torch.randn(1, 3, 224, 224)
    assert ltmp_core.count_flops(model) == counted_macs(model, x)
    ltmp_core.apply_plan(model, plan, mode="static")
    assert ltmp_core.count_flops(model) == pytest.approx(counted_macs(model, x), rel=1e-3)


def test_block_macs_at_reduced_width_hand_computed():
    """A tiny block (width 48, 16 per head) keeping 2 heads and 100 MLP units, 17 tokens, no reduction:
    qkv 17*48*96 = 78336, q@k^T and attn@v 2 * 17*17*32 = 18496, proj 17*32*48 = 26112,
    MLP 17*(48*100 + 100*48) = 163200."""
    g = ltmp_core.ViTGeometry.from_model(tiny_model("deit_small"))
    layer = ltmp_core.LayerPlan(heads=2, mlp_hidden=100)
    from ltmp_core.flops import block_macs

    assert block_macs(g, 17, 17, layer) == 78336 + 18496 + 26112 + 163200


def test_patched_cut_model_equals_stock_timm_of_the_cut_model_in_every_mode(arch):
    x = images(4)
    stock = tiny_model(arch)
    model = ltmp_core.prune_width(copy.deepcopy(stock), width_plan(stock), x)
    with torch.no_grad():
        expected = model(x)
    plan = width_plan(stock, op="merge", keep=1.0)  # a merge that keeps everything
    ltmp_core.apply_plan(model, width_plan(stock), mode="static")
    for mode in ("static", "dynamic", "soft"):
        ltmp_core.set_mode(model, mode)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    ltmp_core.apply_plan(model, plan.with_layers(merge_threshold=[2.0] * 4), mode="dynamic")  # merges nothing
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    ltmp_core.remove_plan(model)  # the tokens' patch goes; the cut width stays
    assert ltmp_core.block_widths(model) == list(zip(HEADS, UNITS))


def test_plans_and_models_of_other_widths_are_refused_with_the_remedy():
    stock = tiny_model("deit_small")
    plan = width_plan(stock, op="merge", keep=0.8)
    with pytest.raises(LTMPError, match=r"layers\[0\]: the plan keeps 2 heads and 100 MLP units, the block has 3 "
                                         r"and 192; cut the width first: ltmp_core.prune_width"):
        ltmp_core.apply_plan(copy.deepcopy(stock), plan)
    cut = ltmp_core.prune_width(copy.deepcopy(stock), plan)
    with pytest.raises(LTMPError, match=r"layers\[0\]: the plan keeps 3 heads and 192 MLP units, the block has 2 "
                                         r"and 100; the model's width was cut for another plan"):
        ltmp_core.apply_plan(cut, ltmp_core.make_plan(ltmp_core.ViTGeometry.from_model(cut), op="merge", keep=0.8))
    # make_plan of a cut model keeps the widths it has.
    assert ltmp_core.make_plan(cut, op="merge", keep=0.8).widths() == list(zip(HEADS, UNITS))
    with pytest.raises(LTMPError, match=r"layers\[0\]: keeps 3 heads and 100 MLP units; the block has only 2 and 100"):
        ltmp_core.prune_width(cut, ltmp_core.make_plan(cut, op="none", heads=3))
    with pytest.raises(LTMPError, match="importance: 'taylor' needs a calibration batch"):
        ltmp_core.prune_width(copy.deepcopy(stock), plan, importance="taylor")
    with pytest.raises(LTMPError, match="model: already patched; cut the width first"):
        ltmp_core.prune_width(ltmp_core.apply_plan(copy.deepcopy(stock), ltmp_core.make_plan(stock)), plan)
    other = tiny_model("deit_small", num_heads=4, embed_dim=64)
    with pytest.raises(LTMPError, match="plan: made for blocks of 3 heads and 192 MLP units"):
        ltmp_core.prune_width(other, plan)


def test_a_cut_model_can_be_cut_further_and_keeps_its_first_geometry():
    stock = tiny_model("deit_small")
    g = ltmp_core.ViTGeometry.from_model(stock)
    model = ltmp_core.prune_width(copy.deepcopy(stock), width_plan(stock))
    narrower = ltmp_core.make_plan(g, op="none", heads=[1, 1, 2, 1], mlp_hidden=[50, 96, 25, 7])
    ltmp_core.prune_width(model, narrower, images(4))
    assert ltmp_core.block_widths(model) == narrower.widths() and ltmp_core.ViTGeometry.from_model(model) == g
    assert ltmp_core.count_flops(model) / ltmp_core.unreduced_macs(g) == pytest.approx(
        ltmp_core.plan_flops_ratio(narrower))


def test_trained_file_of_a_cut_model_loads_into_a_stock_model(tmp_path):
    x = images(4)
    stock = tiny_model("deit_small")
    plan = width_plan(stock, op="merge+prune", keep=0.7)
    model = ltmp_core.prune_width(copy.deepcopy(stock), plan, x)
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, x)
    ltmp_core.set_mode(model, "dynamic")
    with torch.no_grad():
        expected = model(x)
    path = ltmp_core.save_trained(model, tmp_path / "model.safetensors")
    loaded = ltmp_core.load_trained(path, tiny_model("deit_small", seed=5))
    assert ltmp_core.block_widths(loaded) == list(zip(HEADS, UNITS))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)


def ltmp_attributes(model: torch.nn.Module) -> list[str]:
    """The attributes ltmp_core left on the model object itself."""
    return sorted(k for k in vars(model) if "ltmp" in k)


def test_a_width_cut_model_after_remove_plan_reports_its_real_geometry():
    """Every block cut to 2 heads of 16 and 96 MLP units: once the plan is removed the model is stock
    timm at those widths, and its geometry says so (qkv 48*96 + proj 32*48 = 6144 MACs per token in
    attention, 48*96 + 96*48 = 9216 in the MLP), no longer the geometry it was cut from."""
    stock = tiny_model("deit_small")
    full = ltmp_core.ViTGeometry.from_model(stock)
    plan = ltmp_core.make_plan(stock, op="merge", keep=0.75, heads=2, mlp_hidden=96)
    model = ltmp_core.prune_width(copy.deepcopy(stock), plan)
    ltmp_core.apply_plan(model, plan, mode="static")
    assert ltmp_core.ViTGeometry.from_model(model) == full  # patched: ratios of the unreduced model
    assert ltmp_core.count_flops(model) / ltmp_core.unreduced_macs(full) == pytest.approx(
        ltmp_core.plan_flops_ratio(plan, static=True))
    ltmp_core.remove_plan(model)
    assert ltmp_attributes(model) == [] and type(model) is VisionTransformer
    real = ltmp_core.ViTGeometry.from_model(model)
    assert real == dataclasses.replace(full, num_heads=2, mlp_hidden=96, attn_macs_per_token=6144,
                                       mlp_macs_per_token=9216)
    x = images(1)
    assert ltmp_core.count_flops(model) == ltmp_core.unreduced_macs(real) == counted_macs(model, x)


def test_blocks_of_different_widths_after_remove_plan_are_refused_until_the_plan_comes_back():
    """Blocks cut to different widths have no one geometry of their own: without the state that
    prune_width left, from_model says why; applying the plan they were cut for takes the geometry
    from the plan, and FLOPs ratios are again ratios of the unreduced model."""
    x = images(4)
    stock = tiny_model("deit_small")
    full = ltmp_core.ViTGeometry.from_model(stock)
    plan = width_plan(stock, op="prune", keep=0.5)
    model = ltmp_core.prune_width(copy.deepcopy(stock), plan, x)
    ltmp_core.remove_plan(model)  # not patched: it drops the record of the cut all the same
    assert ltmp_attributes(model) == []
    with pytest.raises(LTMPError, match=r"model.blocks\[1\]: the blocks differ in width, which no one geometry "
                                        r"describes; .*ltmp_core.apply_plan\(model, plan\) takes it from the plan"):
        ltmp_core.ViTGeometry.from_model(model)
    ltmp_core.apply_plan(model, plan, mode="static")
    assert ltmp_core.ViTGeometry.from_model(model) == full
    assert ltmp_core.count_flops(model) / ltmp_core.unreduced_macs(full) == pytest.approx(
        ltmp_core.plan_flops_ratio(plan, static=True))


def test_a_cut_model_keeps_all_ltmp_state_in_one_attribute_until_remove_plan():
    x = images(8)
    stock = tiny_model("deit_small")
    full = ltmp_core.ViTGeometry.from_model(stock)
    plan = width_plan(stock, op="merge+prune", keep=0.6)
    model = ltmp_core.prune_width(copy.deepcopy(stock), plan, x)
    assert ltmp_attributes(model) == ["_ltmp"]
    with pytest.raises(LTMPError, match=r"layers\[0\].merge_threshold: not set, and mode 'soft' needs it"):
        ltmp_core.apply_plan(model, plan, mode="soft")
    assert not ltmp_core.is_patched(model) and ltmp_core.ViTGeometry.from_model(model) == full  # left as it was
    ltmp_core.apply_plan(model, plan, mode="static")
    assert ltmp_attributes(model) == ["_ltmp"]
    ltmp_core.apply_plan(model, width_plan(stock, op="merge", keep=0.8), mode="static")  # re-patched
    assert ltmp_core.ViTGeometry.from_model(model) == full
    # calibrate_to_flops aims at a fraction of the unreduced model's cost, the cut width included.
    ltmp_core.calibrate_to_flops(model, x, 0.4)
    assert 0.39 <= float(ltmp_core.image_macs(model).mean()) / ltmp_core.unreduced_macs(full) <= 0.4
    ltmp_core.remove_plan(model)
    assert ltmp_attributes(model) == [] and all(ltmp_attributes(b) == [] for b in model.blocks)
