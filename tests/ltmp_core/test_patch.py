"""Patching timm ViTs: checked against stock timm outputs and invariants, in every mode."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, ParallelScalingBlock, ResPostBlock, VisionTransformer

import ltmp_core
from ltmp_core import LTMPError
from tests.conftest import ARCHITECTURES, TINY, assert_grouped_attention_equals_padded, images, tiny_model

MIXED_OPS = ["merge", "prune", "squeeze", "merge+squeeze"]
ALL_OPS = ["merge+prune", "squeeze", "merge", "prune"]
MODES = ["soft", "dynamic", "static"]


def calibrated(arch: str, ops=MIXED_OPS, keep=(0.75, 0.7, 0.7, 0.6), mode="dynamic", x=None, **kw):
    model = tiny_model(arch, **kw)
    plan = ltmp_core.make_plan(model, op=list(ops), keep=list(keep))
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8) if x is None else x)
    ltmp_core.set_mode(model, mode)
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("mode", MODES)
def test_none_plan_equals_stock_timm(arch, mode, fused):
    model = tiny_model(arch, fused=fused)
    x = images()
    with torch.no_grad():
        expected = model(x)
        ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="none"), mode=mode)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def with_duplicate_patches(model, pairs):
    """An image whose patches ``a`` and ``b`` (and their position embeddings) are identical."""
    x = images(1, seed=7)
    p = model.patch_embed.patch_size[0]
    cols = model.patch_embed.grid_size[1]
    offset = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        for a, b in pairs:
            ra, ca, rb, cb = a // cols, a % cols, b // cols, b % cols
            x[..., rb * p:(rb + 1) * p, cb * p:(cb + 1) * p] = x[..., ra * p:(ra + 1) * p, ca * p:(ca + 1) * p]
            model.pos_embed[:, offset + b] = model.pos_embed[:, offset + a]
    return x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["deit_small", "deit_small_distilled", "reg4_dinov2", "avg_pool"])
def test_merging_exact_duplicates_changes_nothing(arch, mode):
    """ToMe's invariant: with proportional attention, two identical tokens act as one of size 2."""
    model = tiny_model(arch)
    pairs = [(0, 1), (6, 7), (12, 13)]  # (destination, source) in the bipartite split
    x = with_duplicate_patches(model, pairs)
    with torch.no_grad():
        expected = model(x)
        n = model.patch_embed.num_patches
        plan = ltmp_core.make_plan(model, op=["merge", "none", "none", "none"], keep=[(n - 3) / n, 1, 1, 1])
        plan = plan.with_layers(merge_threshold=[0.99999, None, None, None])
        ltmp_core.apply_plan(model, plan, mode=mode)
        got = model(x)
    p = model.num_prefix_tokens
    assert ltmp_core.token_counts(model)[:, 0].tolist() == [p + n] + [p + n - 3] * 4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tau", [1e-3, 1.0])
@pytest.mark.parametrize("arch", ["deit_small", "deit_small_distilled", "reg4_dinov2", "qk_norm", "avg_pool"])
def test_soft_mode_predicts_like_dynamic(arch, tau):
    """Soft masks are hard in the forward pass (straight-through), so soft == dynamic to 1e-5."""
    x = images(8)
    model = calibrated(arch, ops=ALL_OPS)
    with torch.no_grad():
        hard = model(x)
        hard_counts = ltmp_core.token_counts(model)
        plan = ltmp_core.get_plan(model).with_layers(tau=[tau] * 4)
        ltmp_core.apply_plan(model, plan, mode="soft")
        soft = model(x)
        soft_counts = ltmp_core.token_counts(model)
    assert torch.equal(soft_counts, hard_counts)
    assert hard_counts[-1].min() < hard_counts[0].min(), "the plan really removed tokens"
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-5)
    assert torch.equal(soft.argmax(-1), hard.argmax(-1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_dynamic_mode_is_batch_invariant(arch, fused):
    x = images(6)
    model = calibrated(arch, fused=fused, x=images(8, seed=3))
    with torch.no_grad():
        batched = model(x)
        counts = ltmp_core.token_counts(model)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert (counts.max(dim=1).values > counts.min(dim=1).values).any(), "images kept different counts (padding)"
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["deit_small", "reg4_dinov2", "deit_small_distilled"])
def test_dynamic_attention_in_length_groups_equals_attention_over_the_padded_batch(arch, monkeypatch):
    # `cls` importance: every block runs the fused attention, the one that runs in groups
    model = tiny_model(arch).double()
    plan = ltmp_core.make_plan(model, op=["prune", "merge", "squeeze", "merge+prune"], keep=[0.7, 0.7, 0.7, 0.6],
                               importance="cls")
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8, seed=3).double())
    ltmp_core.set_mode(model, "dynamic")
    assert_grouped_attention_equals_padded(model, images(6).double(), monkeypatch)


def test_length_groups_by_hand():
    from ltmp_core.attention import length_groups

    # 100 and 96 together: 2 * 100^2 = 20000 <= 1.1 * (10000 + 9216); 60 would make 3 * 100^2 = 30000 >
    # 1.1 * 22816 = 25098: a new group, which 58 joins (2 * 3600 <= 1.1 * 6964).
    assert length_groups([60, 100, 58, 96]) == [([1, 3], 100), ([0, 2], 60)]
    assert length_groups([7, 7, 7]) == [([0, 1, 2], 7)]  # equal lengths share a group
    assert length_groups([7, 7, 7], slack=0.0) == [([0, 1, 2], 7)]
    assert length_groups([5, 9], slack=None) == [([0], 5), ([1], 9)]  # each alone, in the batch's order
    # 100, 80, 60, 40 are four groups at slack 0.1; at most two: slack 0.2 still keeps 100 and 80 apart
    # (2 * 10000 > 1.2 * 16400), 0.4 pairs them and 60 with 40 (2 * 3600 <= 1.4 * 5200)
    assert len(length_groups([100, 80, 60, 40])) == 4
    assert length_groups([100, 80, 60, 40], max_groups=2) == [([0, 1], 100), ([2, 3], 60)]


@pytest.mark.parametrize(
    ("ops", "keep", "counts"),
    [  # by hand, from 16 patches: each layer keeps round(keep * tokens in), halves rounded up
        (["merge", "merge", "merge", "merge"], [0.5, 0.75, 0.9, 0.6], [8, 6, 5, 3]),  # 5.4 -> 5
        (["prune", "squeeze", "none", "prune"], [0.8, 0.5, 1.0, 0.3], [13, 7, 7, 2]),  # 12.8, 6.5, 2.1
        (["merge+prune", "merge+squeeze", "merge+prune", "squeeze"], [0.6, 0.6, 0.5, 0.5], [10, 6, 3, 2]),
    ],
)
def test_static_mode_keeps_exactly_the_planned_counts(arch, ops, keep, counts):
    model = tiny_model(arch)
    plan = ltmp_core.make_plan(model, op=ops, keep=keep)
    assert list(plan.static_counts()) == counts
    ltmp_core.apply_plan(model, plan, mode="static")
    with torch.no_grad():
        out = model(images(5))
    p = model.num_prefix_tokens
    expected = [p + 16] + [p + n for n in counts]
    assert ltmp_core.token_counts(model).tolist() == [[float(c)] * 5 for c in expected]
    assert out.shape == (5, 10) and torch.isfinite(out).all()


def test_soft_mode_gradients_reach_thresholds_only():
    model = calibrated("deit_small", ops=ALL_OPS, mode="soft")
    thresholds = ltmp_core.threshold_parameters(model)
    assert len(thresholds) == 5  # merge+prune has two, squeeze, merge and prune one each
    ids = {id(p) for p in thresholds}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    x = images(8)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(8) % 10)
    loss = loss + ltmp_core.flops_budget_loss(model, 0.3) + ltmp_core.layer_budget_loss(model)
    loss.backward()
    for p in thresholds:
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad.abs() > 0
    for p in model.parameters():
        if id(p) not in ids:
            assert p.grad is None


def test_budget_gradient_points_the_right_way():
    """A higher merge threshold merges less (more FLOPs); a higher prune threshold prunes more."""
    model = calibrated("deit_small", ops=["merge", "prune", "merge", "prune"], mode="soft")
    model(images(8))
    ratio = ltmp_core.expected_flops_ratio(model)
    ratio.backward()
    merge = sum(p.grad for _, name, p in ltmp_core.thresholds(model) if name == "merge_threshold")
    prune = sum(p.grad for _, name, p in ltmp_core.thresholds(model) if name == "prune_threshold")
    assert merge > 0 and prune < 0


def hand_set(values: dict[str, list[float | None]], scales=("raw", "relative", "relative", "relative")):
    """A tiny model patched with thresholds set by hand: merge+prune, merge, prune, prune."""
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op=["merge+prune", "merge", "prune", "prune"], keep=0.75,
                               importance_scale=list(scales))
    return ltmp_core.apply_plan(model, plan.with_layers(**values), mode="dynamic")


def test_thresholds_are_every_blocks_own_parameters_in_block_order():
    model = hand_set({"merge_threshold": [0.9, 0.8, None, None], "prune_threshold": [0.1, None, 1.5, 0.7]})
    got = ltmp_core.thresholds(model)
    assert [(i, name) for i, name, _ in got] == [(0, "merge_threshold"), (0, "prune_threshold"), (1, "merge_threshold"),
                                                (2, "prune_threshold"), (3, "prune_threshold")]
    assert [float(p.detach()) for _, _, p in got] == pytest.approx([0.9, 0.1, 0.8, 1.5, 0.7])
    params = dict(model.named_parameters())
    assert all(p is params[f"blocks.{i}.{name}"] for i, name, p in got)
    assert ltmp_core.threshold_parameters(model) == [p for _, _, p in got]
    assert ltmp_core.threshold_names(model) == [name for _, name, _ in got]
    with pytest.raises(LTMPError, match="model: not patched"):
        ltmp_core.thresholds(tiny_model("deit_small"))


def test_clamp_thresholds_follows_ltmp_and_leaves_relative_prune_thresholds_open_above():
    """[0, 1] for merge thresholds and raw prune thresholds; relative prune thresholds (1 is an average
    token) are clamped at 0 only."""
    model = hand_set({"merge_threshold": [1.7, -0.3, None, None], "prune_threshold": [1.2, None, 2.5, -0.5]})
    ltmp_core.clamp_thresholds(model)
    assert [float(p.detach()) for _, _, p in ltmp_core.thresholds(model)] == [1.0, 1.0, 0.0, 2.5, 0.0]
    inside = hand_set({"merge_threshold": [0.25, 0.5, None, None], "prune_threshold": [0.004, None, 0.75, 0.125]},
                      scales=["raw", "relative", "raw", "relative"])
    ltmp_core.clamp_thresholds(inside)
    assert [float(p.detach()) for _, _, p in ltmp_core.thresholds(inside)] == pytest.approx([0.25, 0.004, 0.5, 0.75, 0.125])
    assert all(p.requires_grad and p.is_leaf for _, _, p in ltmp_core.thresholds(model))


def test_calibration_puts_each_layer_on_its_budget():
    """Each layer's mean kept fraction is its budget, rounded to whole tokens per image."""
    x = images(16)
    keep = (0.75, 0.6, 0.7, 0.5)
    model = calibrated("deit_small", ops=ALL_OPS, keep=keep, x=x)
    with torch.no_grad():
        model(x)
    patches = ltmp_core.token_counts(model) - 1
    # Block 0 sees 16 patches in every image: 0.75 of 16 is 12, on average over the 16 images (a merge
    # then a prune, each calibrated on pooled scores: at most one token off in the whole batch).
    assert abs(float(patches[1].mean()) - 12.0) <= 1 / 16
    for layer, k in enumerate(keep):
        n_in = patches[layer]
        target = (ltmp_core.kept_count(k, n_in) / n_in).mean()  # whole tokens: the rule test_plan pins
        kept = (patches[layer + 1] / n_in).mean()
        assert abs(kept - target) < 0.02, (layer, kept, target)
    assert patches[-1].float().std() > 0, "thresholds, not counts: images differ"


def test_exported_plan_reproduces_the_model(tmp_path):
    x = images(6)
    model = calibrated("deit_small", ops=ALL_OPS)
    with torch.no_grad():
        expected = model(x)
    path = ltmp_core.save_plan(ltmp_core.get_plan(model), tmp_path / "plan.json")
    fresh = tiny_model("deit_small")
    ltmp_core.apply_plan(fresh, ltmp_core.load_plan(path), mode="dynamic")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-6)


def test_remove_plan_restores_stock_timm():
    model = tiny_model("deit3_small")
    x = images()
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(x)
        ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="merge+prune", keep=0.5))
        assert not torch.allclose(model(x), expected)
        ltmp_core.remove_plan(model)
        got = model(x)
    assert type(model) is VisionTransformer and all(type(b) is Block for b in model.blocks)
    assert not ltmp_core.is_patched(model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_reapplying_a_plan_replaces_the_old_one():
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="prune", keep=0.5))
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="none"))
    with torch.no_grad():
        model(images())
    assert ltmp_core.token_counts(model)[:, 0].tolist() == [17.0] * 5
    assert ltmp_core.threshold_parameters(model) == []


def test_deepcopy_of_a_patched_model_is_independent():
    model = calibrated("deit_small", ops=ALL_OPS)
    clone = copy.deepcopy(model)
    clone.blocks[0].merge_threshold.data.fill_(2.0)  # nothing merges in the clone's first block
    x = images(4)
    with torch.no_grad():
        a, b = model(x), clone(x)
    kept, kept_clone = ltmp_core.token_counts(model)[1], ltmp_core.token_counts(clone)[1]
    assert (kept_clone >= kept).all() and kept_clone.sum() > kept.sum()
    assert ltmp_core.get_plan(model).layers[0].merge_threshold != 2.0
    assert not torch.equal(a, b)


def sharp_model() -> torch.nn.Module:
    """deit_small with its query and key weights 8 times larger: attention as peaked as a trained model's.
    A random model's merge similarities all sit within 0.002 of 1, and bf16 rounds them to other
    winners; here bf16 leaves every decision as fp32 takes it."""
    model = tiny_model("deit_small")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("mode", ["static", "dynamic", "soft"])
def test_bf16_autocast_computes_what_fp32_computes(mode):
    """Under bf16 autocast a patched model keeps stock timm's dtypes (features in fp32, logits in bf16),
    removes the tokens fp32 removes, and is as far from its fp32 logits as stock timm is from its own
    (measured: 0.003-0.006 against stock's 0.0056). Dead keys that took weight, a size bias or a scale
    lost in bf16, would be several times that."""
    x = images(4)
    stock = sharp_model()
    model = sharp_model()
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=ALL_OPS, keep=[0.75, 0.7, 0.7, 0.6]), mode="static")
    ltmp_core.calibrate(model, images(8))
    ltmp_core.set_mode(model, mode)
    with torch.no_grad():
        fp32, stock_fp32 = model(x), stock(x)
        fp32_counts = ltmp_core.token_counts(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, expected_features = stock(x), stock.forward_features(x)
            out, features = model(x), model.forward_features(x)
            counts = ltmp_core.token_counts(model)
    assert (out.dtype, features.dtype) == (expected.dtype, expected_features.dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(counts, fp32_counts) and counts[:, 0].tolist() != [17.0] * 5
    stock_error = (expected.float() - stock_fp32).abs().max()
    error = (out.float() - fp32).abs().max()
    assert 0 < error <= 2 * stock_error, (error, stock_error)


def test_dynamic_mode_without_thresholds_is_refused():
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="merge", keep=0.8)
    with pytest.raises(LTMPError, match=r"layers\[0\]\.merge_threshold: not set"):
        ltmp_core.apply_plan(model, plan, mode="dynamic")
    assert not ltmp_core.is_patched(model), "a refused plan leaves the model stock"


def test_patched_block_refuses_attention_masks():
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="prune", keep=0.5))
    with pytest.raises(LTMPError, match="attention mask"):
        model(images(2), attn_mask=torch.ones(17, 17, dtype=torch.bool))


def unsupported_models():
    yield "resnet", lambda: timm.create_model("resnet18", pretrained=False), "not a timm VisionTransformer"
    yield "prr_pool", lambda: timm.create_model(
        "vit_small_patch16_224", pretrained=False, global_pool="prr", **TINY), "AttentionPoolPrr"
    yield "res_post", lambda: VisionTransformer(block_fn=ResPostBlock, **TINY), "ResPostBlock"
    yield "parallel", lambda: VisionTransformer(block_fn=ParallelScalingBlock, **TINY), "ParallelScalingBlock"


@pytest.mark.parametrize(("name", "make", "message"), list(unsupported_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_unsupported_models_are_refused(name, make, message):
    model = make()
    geometry = ltmp_core.ViTGeometry(
        depth=4, embed_dim=48, num_heads=3, head_dim=16, mlp_hidden=192, num_patches=16, num_prefix_tokens=1,
        num_classes=10, patch_size=(8, 8), img_size=(32, 32), attn_macs_per_token=1, mlp_macs_per_token=1,
        embed_macs=1, head_macs=0)
    plan = ltmp_core.make_plan(geometry, op="prune", keep=0.5)
    with pytest.raises(LTMPError, match=message):
        ltmp_core.apply_plan(model, plan)
    assert not ltmp_core.is_patched(model)


def test_plan_of_wrong_depth_and_unknown_mode_are_refused():
    model = tiny_model("deit_small")
    deep = ltmp_core.make_plan(tiny_model("deit_small", depth=6), op="prune", keep=0.5)
    with pytest.raises(LTMPError, match="6 layers, but the model has 4 blocks"):
        ltmp_core.apply_plan(model, deep)
    with pytest.raises(LTMPError, match="unknown mode 'fast'"):
        ltmp_core.apply_plan(model, ltmp_core.make_plan(model), mode="fast")


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["deit_small", "reg4_dinov2", "avg_pool"])
def test_trace_accounts_for_every_token(arch, mode):
    """Distinct holders of the patches + prefix tokens = the tokens each block kept, per image."""
    model = calibrated(arch, ops=ALL_OPS, mode=mode)
    x = images(5, seed=8)
    trace = ltmp_core.trace_tokens(model, x)
    counts = ltmp_core.token_counts(model)
    p = model.num_prefix_tokens
    assert trace.owner.shape == (4, 5, 16) and trace.grid == (4, 4)
    for layer in range(4):
        for b in range(5):
            held = {o for o in trace.owner[layer, b].tolist() if o >= 0}
            assert len(held) + p == counts[layer + 1, b], (layer, b)
            assert min(held) >= p, "patches are never held by prefix tokens"
    dropped = trace.owner < 0
    assert torch.all(trace.fate[dropped] == ltmp_core.PRUNED)
    assert torch.all(dropped[1:] >= dropped[:-1]), "a dropped patch stays dropped"


def test_trace_group_sizes_are_token_sizes_when_merging():
    model = calibrated("deit_small", ops=["merge"] * 4, keep=(0.75, 0.7, 0.7, 0.6))
    trace = ltmp_core.trace_tokens(model, images(3))
    size = model._ltmp.last.size  # sizes after the last block: patches each token stands for
    for b in range(3):
        groups = torch.bincount(trace.owner[-1, b], minlength=size.shape[1])
        held = groups.nonzero().flatten()
        assert torch.equal(size[b, held], groups[held].float())


def test_trace_puts_exact_duplicates_in_one_group():
    model = tiny_model("deit_small")
    x = with_duplicate_patches(model, [(0, 1), (6, 7)])
    plan = ltmp_core.make_plan(model, op=["merge", "none", "none", "none"], keep=[14 / 16, 1, 1, 1])
    ltmp_core.apply_plan(model, plan.with_layers(merge_threshold=[0.99999, None, None, None]), mode="dynamic")
    owner = ltmp_core.trace_tokens(model, x).owner[0, 0]
    assert owner[0] == owner[1] and owner[6] == owner[7]
    assert len(set(owner.tolist())) == 14


def test_cls_importance_from_the_class_query_equals_the_class_row_of_the_map():
    from ltmp_core.attention import attend

    model = tiny_model("deit_small")
    attn = model.blocks[0].attn
    x = torch.randn(3, 17, 48)
    plain = dict(size=None, alive=None, soft=False, packing=None, num_prefix=1)
    with torch.no_grad():
        _, _, fused = attend(attn, x, importance="cls", **plain)
        # The full map, computed independently from timm's own qkv projection.
        q, k, _ = attn.qkv(x).reshape(3, 17, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
        full = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # [B, H, N, N]
        expected = full[:, :, 0, :].mean(dim=1) * 17
    torch.testing.assert_close(fused[:, 1:], expected[:, 1:])
    assert torch.isinf(fused[:, 0]).all()
    # and mean importance: attention received, averaged over heads and queries, times n
    with torch.no_grad():
        _, _, mean = attend(attn, x, importance="mean", **plain)
    torch.testing.assert_close(mean[:, 1:], full.mean(dim=(1, 2))[:, 1:] * 17)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_cls_importance_plans_fused_and_unfused_agree(mode):
    x = images(6)
    outs = []
    for fused in (True, False):
        model = tiny_model("deit_small", fused=fused)
        plan = ltmp_core.make_plan(model, op=["prune", "squeeze", "merge+prune", "merge+squeeze"], keep=0.7,
                                   importance="cls")
        ltmp_core.apply_plan(model, plan, mode="static")
        ltmp_core.calibrate(model, images(8, seed=3))
        ltmp_core.set_mode(model, mode)
        with torch.no_grad():
            outs.append((model(x), ltmp_core.token_counts(model)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-5)
    assert torch.equal(outs[0][1], outs[1][1])


def test_cls_importance_needs_a_class_token():
    model = tiny_model("avg_pool")
    plan = ltmp_core.make_plan(model, op="prune", keep=0.5, importance="cls")
    with pytest.raises(LTMPError, match=r"layers\[0\]\.importance: 'cls' needs a class token"):
        ltmp_core.apply_plan(model, plan)


@pytest.mark.parametrize("variant", [dict(merge_order="tome"), dict(squeeze_host="tps"),
                                     dict(importance_scale="raw")], ids=lambda v: "-".join(v.values()))
@pytest.mark.parametrize("arch", ["deit_small", "deit_small_distilled", "reg4_dinov2"])
def test_published_variants_keep_the_modes_exact(arch, variant):
    """ToMe's token order, TPS's squeeze and LTMP's raw importance: soft == dynamic, batch-invariant."""
    ops = ["merge+squeeze", "merge", "merge+prune", "squeeze"]
    model = tiny_model(arch)
    plan = ltmp_core.make_plan(model, op=ops, keep=[0.75, 0.7, 0.7, 0.6], **variant)
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8, seed=3))
    x = images(6)
    with torch.no_grad():
        ltmp_core.set_mode(model, "dynamic")
        hard, counts = model(x), ltmp_core.token_counts(model)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        ltmp_core.set_mode(model, "soft")
        soft, soft_counts = model(x), ltmp_core.token_counts(model)
        ltmp_core.set_mode(model, "static")
        static = model(x)
    assert (counts.max(dim=1).values > counts.min(dim=1).values).any(), "padding was exercised"
    torch.testing.assert_close(alone, hard, rtol=0, atol=1e-5)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-5)
    assert torch.equal(soft_counts, counts) and torch.isfinite(static).all()


def test_tome_order_changes_the_next_layers_split():
    """The same plan in ToMe's order and in this project's order merges differently after layer 0."""
    model = tiny_model("deit_small")
    x = images(6)
    outs = []
    for order in ("keep", "tome"):
        plan = ltmp_core.make_plan(model, op="merge", keep=0.75, merge_order=order)
        ltmp_core.apply_plan(model, plan, mode="static")
        with torch.no_grad():
            outs.append(model(x))
    assert not torch.allclose(outs[0], outs[1])


STATIC_VARIANTS = [dict(), dict(merge_order="tome"), dict(squeeze_host="tps"), dict(importance="cls"),
                   dict(merge_order="tome", squeeze_host="tps", importance_scale="raw")]


@pytest.mark.parametrize("variant", STATIC_VARIANTS, ids=lambda v: "-".join(v.values()) or "default")
@pytest.mark.parametrize("arch", ["deit_small", "deit_small_distilled", "reg4_dinov2", "avg_pool"])
def test_static_fast_forms_equal_the_masked_reducers(arch, variant, monkeypatch):
    """Static mode's compact stages compute what the masked reducers followed by compaction compute
    (a stage registered without a fast form runs the masked one): logits and counts, every op."""
    if arch == "avg_pool" and variant.get("importance") == "cls":
        pytest.skip("cls importance needs a class token")
    model = tiny_model(arch)
    x = images(5, seed=4)
    for ops, keep in [(["merge", "merge+prune", "squeeze", "merge+squeeze"], [0.6, 0.7, 0.75, 0.7]),
                      (["merge+squeeze", "prune", "merge", "merge+prune"], [0.5, 0.8, 0.6, 0.55])]:
        plan = ltmp_core.make_plan(model, op=ops, keep=keep, **variant)
        outs = []
        for masked in (False, True):
            with monkeypatch.context() as m:
                if masked:
                    for name, stage in list(ltmp_core.REDUCERS.items()):
                        m.setitem(ltmp_core.REDUCERS, name, dataclasses.replace(stage, static=None))
                patched = ltmp_core.apply_plan(copy.deepcopy(model), plan, mode="static")
                with torch.no_grad():  # fused tokens are written in place
                    outs.append((patched(x), ltmp_core.token_counts(patched)))
                if not masked:  # with gradients they are written to copies, and gradients flow
                    with_grad = patched(x)
                    with_grad.sum().backward()
                    assert patched.head.weight.grad is not None and patched.blocks[0].attn.qkv.weight.grad is not None
        (fast, fast_counts), (masked_out, masked_counts) = outs
        torch.testing.assert_close(fast, masked_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(with_grad.detach(), fast, rtol=0, atol=1e-6)
        assert torch.equal(fast_counts, masked_counts)


@pytest.mark.parametrize("masked", [False, True], ids=["fast", "masked"])
@pytest.mark.parametrize("arch", ["deit_small", "avg_pool"])
def test_static_merge_that_removes_nothing_is_no_op(arch, masked, monkeypatch):
    """A merge stage left with nothing to remove does nothing, not even ToMe's reordering (ToMe at
    r = 0): the plan predicts as the same plan with no op at that layer."""
    if masked:
        monkeypatch.setitem(ltmp_core.REDUCERS, "merge", dataclasses.replace(ltmp_core.REDUCERS["merge"], static=None))
    model = tiny_model(arch)
    x = images(4, seed=2)
    outs = []
    for second in ("merge", "none"):
        plan = ltmp_core.make_plan(model, op=["merge", second, "merge", "merge"], keep=[0.75, 1.0, 0.7, 0.6],
                                   merge_order="tome")
        patched = ltmp_core.apply_plan(copy.deepcopy(model), plan, mode="static")
        with torch.no_grad():
            outs.append(patched(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_static_stages_that_remove_nothing_do_not_run(monkeypatch):
    """In static mode a stage left with nothing to remove is not run, and neither are the importance scores
    only it would read: a prune that keeps everything asks attention for no scores (the block runs as an
    unreduced one), and a merge+prune whose prune keeps everything asks for none either; the outputs equal
    the same plan with those stages left out."""
    import ltmp_core.patch as patch

    asked: list[str | None] = []
    real = patch.attend

    def spy(*args, importance=None, **kwargs):
        asked.append(importance)
        return real(*args, importance=importance, **kwargs)

    monkeypatch.setattr(patch, "attend", spy)
    model = tiny_model("deit_small")
    x = images(4, seed=3)
    outs = []
    for ops, merge_keep in [(["prune", "merge+prune", "prune", "prune"], [None, 0.75, None, None]),
                            (["none", "merge", "prune", "prune"], None)]:
        plan = ltmp_core.make_plan(model, op=ops, keep=[1.0, 0.75, 0.8, 0.7], importance="cls", merge_keep=merge_keep)
        patched = ltmp_core.apply_plan(copy.deepcopy(model), plan, mode="static")
        asked.clear()
        with torch.no_grad():
            outs.append(patched(x))
        assert asked == [None, None, "cls", "cls"], (ops, asked)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["deit_small", "avg_pool"])
def test_static_sizes_are_the_traced_groups(arch):
    """The sizes static mode keeps (they weigh attention and average pooling) are the numbers of
    patches the trace finds held by each token, position by position."""
    model = tiny_model(arch)
    plan = ltmp_core.make_plan(model, op=["merge", "merge+squeeze", "merge", "merge+prune"], keep=[0.6, 0.6, 0.7, 0.6],
                               merge_order="tome")
    ltmp_core.apply_plan(model, plan, mode="static")
    x = images(3, seed=5)
    with torch.no_grad():
        model(x)
    sizes = model._ltmp.last.size[:, model.num_prefix_tokens:]
    trace = ltmp_core.trace_tokens(model, x)
    p = model.num_prefix_tokens
    for b in range(3):
        held = trace.owner[-1, b]
        groups = torch.bincount(held[held >= 0] - p, minlength=sizes.shape[1]).float()
        assert torch.equal(groups, sizes[b]), b


def test_static_plan_compiles_to_one_graph():
    """torch.compile sees the whole static forward as one graph: no graph break, no host sync."""
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op=["merge+prune", "merge+squeeze", "squeeze", "merge"], keep=[0.6, 0.6, 0.7, 0.6])
    ltmp_core.apply_plan(model, plan, mode="static")
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(images(2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
