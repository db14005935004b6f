"""The FLOP model against PyTorch's own counter, on stock and patched models, and its inverse."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import timm
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ltmp_core
from ltmp_core import LayerPlan, LTMPError, ReductionPlan, ViTGeometry
from tests.conftest import ARCHITECTURES, counted_macs, images, tiny_model


def full_size(name: str, **kwargs) -> torch.nn.Module:
    """A full-size model on the meta device: shapes without memory or compute."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


META_IMAGE = dict(size=(1, 3, 224, 224), device="meta")

FULL_SIZE = [
    ("deit_tiny_patch16_224", {}),
    ("deit_small_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("deit3_small_patch16_224", {}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    ("vit_base_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": True}),
]


@pytest.mark.parametrize(("name", "kwargs"), FULL_SIZE, ids=[n for n, _ in FULL_SIZE])
def test_stock_models_match_pytorch_counter(name, kwargs):
    model = full_size(name, **kwargs)
    expected = counted_macs(model, torch.empty(**META_IMAGE))
    assert ltmp_core.count_flops(model) == pytest.approx(expected, rel=0.01)


def test_deit_small_is_4_6_gflops():
    assert round(ltmp_core.count_flops(full_size("deit_small_patch16_224")) / 1e9, 1) == 4.6


PLANS = [
    dict(op="merge", keep=0.8),
    dict(op="prune", keep=0.7),
    dict(op="squeeze", keep=[1.0, 0.5, 1.0, 0.9, 1.0, 0.5, 1.0, 0.9, 1.0, 0.5, 1.0, 1.0]),
    dict(op="merge+prune", keep=0.75),
    dict(op="merge+squeeze", keep=0.6, merge_keep=0.8),
    dict(op=["none", "merge", "prune", "squeeze", "merge+prune", "merge+squeeze"] * 2, keep=0.7),
    dict(op=["prune", "squeeze", "merge+prune", "merge+squeeze"] * 3, keep=0.8, importance="cls"),
    # The published variants: ToMe's order, TPS's squeeze (feature similarity, embed_dim wide), LTMP's units.
    dict(op=["merge", "merge+squeeze", "squeeze", "merge+prune"] * 3, keep=0.8, merge_order="tome",
         squeeze_host="tps", importance_scale="raw"),
]


@pytest.mark.parametrize("plan_kwargs", PLANS, ids=lambda p: str(p["op"])[:30] + p.get("importance", "")
                         + p.get("squeeze_host", ""))
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_static_plans_match_pytorch_counter(name, plan_kwargs, monkeypatch):
    """Static mode's fast forms compare fewer pairs than the masked reducers (sources with
    destinations, pruned tokens with kept ones); the model counts each path as it runs, within 0.1%
    (every op, architecture and path: tests/ltmp_core/test_flops_paths.py)."""
    model = full_size(name)
    plan = ltmp_core.make_plan(model, **plan_kwargs)
    ltmp_core.apply_plan(model, plan, mode="static")
    compact = counted_macs(model, torch.empty(**META_IMAGE))
    assert ltmp_core.count_flops(model) == pytest.approx(compact, rel=1e-3)
    for stage_name, stage in list(ltmp_core.REDUCERS.items()):
        monkeypatch.setitem(ltmp_core.REDUCERS, stage_name, dataclasses.replace(stage, static=None))
    ltmp_core.apply_plan(model, plan, mode="static")
    expected = counted_macs(model, torch.empty(**META_IMAGE))
    analytic = ltmp_core.count_flops(model)
    assert analytic == pytest.approx(expected, rel=1e-3)
    assert compact <= expected  # equal where no stage matches tokens (prune)
    stock = ltmp_core.unreduced_macs(plan.geometry)
    assert ltmp_core.plan_flops_ratio(plan, static=True) == pytest.approx(analytic / stock, rel=1e-9)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_measured_dynamic_flops_match_counter_on_one_image(arch, fused):
    model = tiny_model(arch, fused=fused)
    plan = ltmp_core.make_plan(model, op=["merge+prune", "squeeze", "merge", "prune"], keep=[0.7, 0.6, 0.8, 0.5])
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8))
    ltmp_core.set_mode(model, "dynamic")
    x = images(3, seed=11)
    measured, kept = ltmp_core.measure_flops(model, [x[i:i + 1] for i in range(3)])
    per_image = [counted_macs(model, x[i:i + 1]) for i in range(3)]
    assert measured == pytest.approx(sum(per_image) / 3, rel=0.01)
    # The same images in one padded batch cost the same per image: padding is not counted.
    batched, kept_batched = ltmp_core.measure_flops(model, [(x, torch.zeros(3))])
    assert batched == pytest.approx(measured, rel=1e-9)
    assert kept == pytest.approx(kept_batched)
    assert len(kept) == 4 and kept[-1] < kept[0] <= 16 + model.num_prefix_tokens


def test_measure_flops_of_stock_model_is_count_flops():
    model = tiny_model("reg4_dinov2")
    mean, kept = ltmp_core.measure_flops(model, [images(4), images(2)])
    assert mean == ltmp_core.count_flops(model)
    assert kept == [21.0] * 4


def test_measure_flops_stops_at_max_images():
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="prune", keep=0.5), mode="static")
    ltmp_core.calibrate(model, images(8, seed=99))
    ltmp_core.set_mode(model, "dynamic")  # every image keeps its own count
    batches = [images(4, seed=s) for s in range(10)]
    handed_out = []

    def loader():
        for b in batches:
            handed_out.append(b)
            yield b

    mean, kept = ltmp_core.measure_flops(model, loader(), max_images=6)
    assert len(handed_out) == 2  # 4 + 2 images, then stop
    first_six = torch.cat(batches)[:6]
    alone = [ltmp_core.measure_flops(model, [first_six[i : i + 1]]) for i in range(6)]
    assert mean == pytest.approx(sum(m for m, _ in alone) / 6, rel=1e-9)
    assert kept == pytest.approx([sum(k[l] for _, k in alone) / 6 for l in range(4)])
    assert len({m for m, _ in alone}) > 1  # the images differ, so the cut at 6 matters
    with pytest.raises(LTMPError, match="no images"):
        ltmp_core.measure_flops(model, [])


def test_count_flops_refuses_dynamic_mode():
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="prune", keep=0.5), mode="static")
    ltmp_core.calibrate(model, images())
    ltmp_core.set_mode(model, "dynamic")
    with pytest.raises(LTMPError, match="measure_flops"):
        ltmp_core.count_flops(model)


def test_budget_term_equals_measured_ratio_when_masks_are_hard():
    """Soft mode on one image: the differentiable ratio is what the counter measures when reduced."""
    model = tiny_model("deit_small_distilled")
    plan = ltmp_core.make_plan(model, op=["merge+squeeze", "prune", "merge", "merge+prune"], keep=[0.6, 0.7, 0.8, 0.5])
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8))
    x = images(1, seed=5)
    stock = counted_macs(tiny_model("deit_small_distilled"), x)
    ltmp_core.set_mode(model, "dynamic")
    measured = counted_macs(model, x) / stock
    ltmp_core.set_mode(model, "soft")
    model(x)
    ratio = ltmp_core.expected_flops_ratio(model)
    assert ratio.requires_grad
    assert float(ratio.detach()) == pytest.approx(measured, rel=1e-6)
    assert measured < 0.8


def test_layer_budget_term_is_zero_on_budget():
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="prune", keep=[0.75, 0.5, 0.5, 0.5])
    ltmp_core.apply_plan(model, plan, mode="static")
    model(images(2))  # static counts follow the budgets exactly: 16 -> 12 -> 6 -> 3 -> 2 (rounded)
    kept = ltmp_core.kept_fractions(model)
    torch.testing.assert_close(kept, torch.tensor([12 / 16, 6 / 12, 3 / 6, 2 / 3]))
    # Every layer keeps what it can in whole tokens (3 -> 2 is round(1.5) = 2): nothing to pay.
    assert float(ltmp_core.layer_budget_loss(model)) == 0.0


def test_layer_budget_term_by_hand_and_only_own_thresholds_learn():
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="prune", keep=[0.5, 0.5, 0.5, 0.5])
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8))
    first = model.blocks[0].prune_threshold
    with torch.no_grad():
        first.fill_(-1.0)  # block 0 now prunes nothing: kept 1.0 against a budget of 0.5
    ltmp_core.set_mode(model, "soft")
    model(images(8))
    kept = ltmp_core.kept_fractions(model)
    assert float(kept[0].detach()) == 1.0
    assert float(ltmp_core.layer_budget_loss(model).detach()) >= (1.0 - 0.5) ** 2
    # Each block's kept fraction moves that block's threshold only: the later blocks' fractions do
    # not reach block 0's threshold, though their inputs depend on it.
    thresholds = ltmp_core.threshold_parameters(model)
    for i in range(4):
        grads = torch.autograd.grad(kept[i], thresholds, allow_unused=True, retain_graph=True)
        moved = [j for j, g in enumerate(grads) if g is not None and g.abs() > 0]
        assert moved in ([], [i]), (i, moved)
    # The global FLOPs term, in contrast, does reach earlier thresholds through later counts.
    grads = torch.autograd.grad(ltmp_core.expected_flops_ratio(model), thresholds, retain_graph=True)
    assert grads[0].abs() > 0


GEOMETRY = ViTGeometry.from_model(full_size("deit_small_patch16_224"))
OPS = list(ltmp_core.OPS)


@st.composite
def plans(draw, depth=12):
    ops = draw(st.lists(st.sampled_from(OPS), min_size=depth, max_size=depth))
    keeps = [
        1.0 if op == "none" else draw(st.floats(0.5 if op == "merge" else 0.05, 1.0))
        for op in ops
    ]
    return ReductionPlan(tuple(LayerPlan(op=o, keep=k) for o, k in zip(ops, keeps)), geometry=GEOMETRY)


@settings(max_examples=150, deadline=None)
@given(plans(), st.integers(0, 11), st.floats(0.0, 1.0), st.booleans())
def test_plan_ratio_is_monotone_in_every_budget(plan, layer, t, static):
    old = plan.layers[layer]
    if old.op == "none":
        return
    higher = old.keep + t * (1.0 - old.keep)
    raised = plan.with_layers(keep=[higher if i == layer else k for i, k in enumerate(plan.keeps)])
    assert ltmp_core.plan_flops_ratio(raised, static=static) >= ltmp_core.plan_flops_ratio(plan, static=static) - 1e-12
    assert 0 < ltmp_core.plan_flops_ratio(plan) <= 1.0 + 1e-12


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(OPS), min_size=12, max_size=12),
    st.lists(st.floats(0.0, 5.0), min_size=12, max_size=12),
    st.floats(0.25, 0.9),
)
@example(["merge"] + ["none"] * 11, [1.0] * 12, 0.3)  # merging can at most halve one layer: infeasible
@example(["merge", "prune"] + ["none"] * 10, [1.0, 0.0] + [1.0] * 10, 0.5)  # a zero weight does not cut
# The only reducing layer has a tiny weight; a `none` layer's large weight does not make it zero.
@example(["none", "none", "prune"] + ["none"] * 9, [0.0, 0.0, 2.220446049250313e-16] + [0.0] * 8 + [1.0], 0.5)
def test_budgets_for_ratio_lands_on_target_or_says_why(ops, weights, target):
    try:
        keeps = ltmp_core.budgets_for_ratio(ops, weights, GEOMETRY, target)
    except LTMPError as e:
        # The reason names the floor, and the floor is real: just above it is reachable, and lands.
        found = re.search(r"cannot be reached.*lowest reachable is ([0-9.]+)", str(e))
        assert found, str(e)
        lowest = float(found.group(1))
        assert lowest > target * 0.999
        if lowest * 1.02 < 1.0:
            above = ltmp_core.budgets_for_ratio(ops, weights, GEOMETRY, lowest * 1.02)
            plan = ReductionPlan(tuple(LayerPlan(op=o, keep=k) for o, k in zip(ops, above)), geometry=GEOMETRY)
            assert ltmp_core.plan_flops_ratio(plan) == pytest.approx(lowest * 1.02, rel=0.005)
        return
    plan = ReductionPlan(tuple(LayerPlan(op=o, keep=k) for o, k in zip(ops, keeps)), geometry=GEOMETRY)
    assert ltmp_core.plan_flops_ratio(plan) == pytest.approx(target, rel=0.005)
    # Weights are compared among the reducing layers only: a `none` layer takes no budget.
    top = max((w for op, w in zip(ops, weights) if op != "none"), default=0.0)
    for op, w, k in zip(ops, weights, keeps):
        if op == "none" or w < 1e-6 * top:
            assert k == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 3.0), min_size=12, max_size=12), st.floats(0.3, 0.9))
def test_static_budgets_cost_at_most_the_target_in_whole_tokens(weights, target):
    """Static mode keeps whole tokens, so its ratio moves in steps: with ``static=True`` the budgets
    cost at most the target in static mode (the continuous solution may cost more once rounded), and
    no more than a few token steps under it."""
    ops = ["merge+prune"] * 12
    try:
        keeps = ltmp_core.budgets_for_ratio(ops, weights, GEOMETRY, target, static=True)
    except LTMPError as e:
        assert "cannot be reached" in str(e)
        return
    plan = ReductionPlan(tuple(LayerPlan(op=o, keep=k) for o, k in zip(ops, keeps)), geometry=GEOMETRY)
    ratio = ltmp_core.plan_flops_ratio(plan, static=True)
    assert target * 0.97 <= ratio <= target or all(k == 1.0 for k in keeps)


def test_budgets_for_ratio_orders_layers_by_weight():
    ops = ["prune"] * 12
    weights = [0.0] * 6 + [1.0, 2.0] * 3
    keeps = ltmp_core.budgets_for_ratio(ops, weights, GEOMETRY, 0.6)
    assert keeps[:6] == [1.0] * 6
    assert all(keeps[i] > keeps[i + 1] for i in range(6, 12, 2))
    assert math.isclose(keeps[6], keeps[8])


TINY_GEOMETRY = ViTGeometry.from_model(tiny_model("deit_small"))  # 16 patches, 1 class token, 4 blocks


def one_pruning_layer(keep: float) -> ReductionPlan:
    return ltmp_core.make_plan(TINY_GEOMETRY, op=["prune", "none", "none", "none"], keep=[keep, 1, 1, 1])


@pytest.mark.parametrize(("between", "tokens"), [((9, 10), 9), ((10, 10), 10), ((10, 11), 10)])
def test_static_budgets_keep_the_most_whole_tokens_the_aim_pays_for(between, tokens):
    """One layer prunes the 16 patches: an aim between what 9 and 10 kept tokens cost buys 9, what 10
    cost buys 10, and an aim short of 11 still 10."""
    low, high = (ltmp_core.plan_flops_ratio(one_pruning_layer(n / 16), static=True) for n in between)
    got = ltmp_core.static_budgets(one_pruning_layer(0.3), (low + high) / 2)
    assert got.static_counts()[0] == tokens and got.ops == one_pruning_layer(0.3).ops


def test_static_budgets_keep_the_shape_of_the_budgets():
    """Budgets 0.5 and 0.25 (the second cuts twice as hard in log terms) scaled to cost 0.6: every keep
    raised to one power, so the second stays the first squared. 12 then 6 of its 12 tokens cost at most
    0.6; the next step of that shape, 12 then 7, costs more. At the plan's widths (2 of 3 heads)
    the blocks are cheaper, so the same aim keeps more tokens."""
    plan = ltmp_core.make_plan(TINY_GEOMETRY, op=["prune", "prune", "none", "none"], keep=[0.5, 0.25, 1, 1])
    got = ltmp_core.static_budgets(plan, 0.6)
    assert got.keeps[1] == pytest.approx(got.keeps[0] ** 2) and got.keeps[2:] == (1.0, 1.0)
    assert got.static_counts() == [12, 6, 6, 6]
    assert ltmp_core.plan_flops_ratio(got, static=True) <= 0.6
    assert ltmp_core.plan_flops_ratio(plan.with_keeps([12 / 16, 7 / 12, 1, 1]), static=True) > 0.6
    narrow = ltmp_core.static_budgets(dataclasses.replace(plan, layers=tuple(
        dataclasses.replace(layer, heads=2) for layer in plan.layers)), 0.6)
    assert narrow.keeps[0] > got.keeps[0] and ltmp_core.plan_flops_ratio(narrow, static=True) <= 0.6


def test_static_budgets_keep_thresholds_lift_merge_keep_and_say_what_is_out_of_reach():
    plan = ltmp_core.make_plan(TINY_GEOMETRY, op="merge+prune", keep=0.5, merge_keep=0.6).with_layers(
        merge_threshold=[0.9] * 4, prune_threshold=[0.5] * 4)
    got = ltmp_core.static_budgets(plan, 0.95)
    assert all(layer.keep > 0.6 and layer.merge_keep == layer.keep for layer in got.layers)
    assert [(layer.merge_threshold, layer.prune_threshold) for layer in got.layers] == [(0.9, 0.5)] * 4
    merges = ltmp_core.make_plan(TINY_GEOMETRY, op="merge", keep=0.9)
    with pytest.raises(LTMPError, match=r"target: a FLOPs ratio of 0.100 cannot be reached .*lowest reachable"):
        ltmp_core.static_budgets(merges, 0.1)
    with pytest.raises(LTMPError, match="geometry: the plan carries no geometry"):
        ltmp_core.static_budgets(dataclasses.replace(merges, geometry=None), 0.5)


def test_the_class_query_row_is_counted_where_static_mode_scores_tokens():
    """``cls`` importance adds the class query's row of logits, ``attn_dim * n`` MACs, to a block that
    scores tokens. By hand on ViT-S (197 tokens, 384 wide): a prune that keeps everything in block 0, then
    one that prunes in block 1. Static mode skips block 0's stage and its scores: one row; the masked
    reducers (dynamic mode's count) score in both blocks: two."""
    ops = ["prune", "prune"] + ["none"] * 10
    by_importance = {imp: ReductionPlan(tuple(LayerPlan(op=o, keep=k, importance=imp) for o, k in
                                              zip(ops, [1.0, 0.5] + [1.0] * 10)), geometry=GEOMETRY)
                     for imp in ("cls", "mean")}
    row = 384 * 197
    for static, rows in ((True, 1), (False, 2)):
        cls, mean = (ltmp_core.plan_macs(by_importance[imp], static=static) for imp in ("cls", "mean"))
        assert cls - mean == rows * row, (static, cls - mean)


def test_geometry_json_round_trip_and_validation():
    assert ViTGeometry.from_dict(GEOMETRY.to_dict()) == GEOMETRY
    bad = {**GEOMETRY.to_dict(), "head_dim": 0}
    with pytest.raises(LTMPError, match="geometry.head_dim"):
        ViTGeometry.from_dict(bad)
    assert GEOMETRY.num_tokens == 197 and GEOMETRY.attn_dim == 384


def _measured(model, x) -> float:
    ltmp_core.set_mode(model, "dynamic")
    with torch.no_grad():
        model(x)
    return float(ltmp_core.image_macs(model).mean()) / ltmp_core.unreduced_macs(ViTGeometry.from_model(model))


@pytest.mark.parametrize("target", [0.55, 0.7])
def test_calibrate_to_flops_puts_the_batch_on_the_target_with_one_shift(target):
    model = tiny_model("deit_small")
    offsets = [0.0, 0.01, 0.02, 0.03]
    plan = ltmp_core.make_plan(model, op="merge", keep=0.9).with_layers(merge_threshold=offsets)
    ltmp_core.apply_plan(model, plan, mode="static")
    x = images(16, seed=4)
    solved = ltmp_core.calibrate_to_flops(model, x, target)
    thresholds = [layer.merge_threshold for layer in solved.layers]
    # One shift for all: the offsets between the layers are kept.
    assert [t - thresholds[0] for t in thresholds] == pytest.approx(offsets, abs=1e-6)  # float32 parameters
    ratio = _measured(model, x)
    assert target - 0.01 <= ratio <= target  # on the target, from below
    # Shifting every threshold further changes the ratio the way the bisection assumes.
    ltmp_core.set_thresholds(model, "merge_threshold", [t + 0.05 for t in thresholds])
    assert _measured(model, x) > ratio
    ltmp_core.set_thresholds(model, "merge_threshold", [t - 0.05 for t in thresholds])
    assert _measured(model, x) < ratio
    assert all(s != 1.0 for s in ltmp_core.threshold_scales(model)), "the score spreads were measured"


def _steps(n: int):
    """A ratio that is a staircase of ``n`` equal steps over shifts [-1, 1] (a batch's whole tokens)."""
    return lambda shift: math.floor((shift + 1) / 2 * n + 1e-12) / n if shift < 1 else 1.0


@pytest.mark.parametrize("name, ratio", [
    ("line", lambda s: 0.5 + 0.5 * s),
    ("convex", lambda s: math.exp(3 * (s - 1))),
    ("flat then steep", lambda s: 1 / (1 + math.exp(-40 * (s - 0.6)))),
    ("fine staircase", _steps(12 * 256)),
    ("coarse staircase", _steps(7)),
    ("falling", lambda s: 0.5 - 0.5 * s),
])
@pytest.mark.parametrize("flops", [0.05, 0.35, 0.5, 0.9])
def test_the_shift_solver_lands_in_the_window_or_on_a_step(name, ratio, flops):
    """The solver's contract on ratios of known form: at most the target, within 0.2% of it where a shift
    gives such a ratio; where the ratio jumps over the window (a coarse staircase), the highest step at most
    the target. Never more than its 24 evaluations."""
    from ltmp_core.flops import _root

    feasible, other = (-1.0, 1.0) if ratio(-1.0) < ratio(1.0) else (1.0, -1.0)
    if not ratio(feasible) <= flops < ratio(other):
        pytest.skip("no bracket for this target")
    calls = []

    def counted(shift: float) -> float:
        calls.append(shift)
        return ratio(shift)

    found = _root(counted, feasible, ratio(feasible), other, ratio(other), flops)
    got = ratio(found)
    assert got <= flops and len(calls) <= 24
    # The best a shift can give, read off a grid 1e-5 apart (finer than any step here).
    best = max(r for r in map(ratio, (i / 100_000 - 1 for i in range(200_001))) if r <= flops)
    assert got >= min(best, flops * (1 - 2e-3)), (name, got, best, len(calls))


@pytest.mark.parametrize("name, ratio", [
    ("line", lambda s: 0.5 + 0.5 * s),
    ("flat then steep", lambda s: 1 / (1 + math.exp(-40 * (s - 0.6)))),
    ("fine staircase", _steps(12 * 256)),
    ("coarse staircase", _steps(7)),
    ("falling", lambda s: 0.5 - 0.5 * s),
])
@pytest.mark.parametrize("flops", [0.05, 0.35, 0.9])
@pytest.mark.parametrize("start", [-0.6, 0.0, 0.45])
def test_a_solve_from_near_thresholds_lands_where_a_solve_over_the_whole_range_does(name, ratio, flops, start):
    """Thresholds that sit at ``start`` of the scores' range [-1, 1] (shift 0 is ``start``), searched
    outwards from there in doubling steps: the same contract as the whole-range solve (at most the target,
    within 0.2% of it or on the highest step under it), also when the solution is far from ``start``."""
    from ltmp_core.flops import _bracket_near, _root

    rises = ratio(-1.0) < ratio(1.0)
    most, least = (-1.0 - start, 1.0 - start) if rises else (1.0 - start, -1.0 - start)
    if not ratio(start + most) <= flops < ratio(start + least):
        pytest.skip("no bracket for this target")
    calls = []

    def counted(shift: float) -> float:
        calls.append(shift)
        return ratio(start + shift)

    feasible, r_feasible, other, r_other = _bracket_near(counted, flops, 1e-2, most, least, True)
    found = feasible if other is None else _root(counted, feasible, r_feasible, other, r_other, flops)
    got = ratio(start + found)
    best = max(r for r in map(ratio, (i / 100_000 - 1 for i in range(200_001))) if r <= flops)
    assert got <= flops and got >= min(best, flops * (1 - 2e-3)), (name, got, best, len(calls))
    assert len(calls) <= 8 + 24, "at most 8 doublings of 1e-2 span the range"


def _forwards(model) -> list[int]:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_model_a_little_over_its_target_is_put_back_in_fewer_passes_from_near():
    """A plan solved for 0.6 of the FLOPs, then asked for 0.58 (as `search train` puts a trained model back
    on its aim): searched from its thresholds outwards it lands in the same window as a solve over the
    whole range, in fewer forward passes; shifts of the wrong kind are refused."""
    x = images(16, seed=4)
    solved = {}
    for near in (None, 1e-2):
        model = tiny_model("deit_small")
        plan = ltmp_core.make_plan(model, op="merge", keep=0.9).with_layers(merge_threshold=[0.0, 0.01, 0.02, 0.03])
        ltmp_core.apply_plan(model, plan, mode="static")
        ltmp_core.calibrate_to_flops(model, x, 0.6)
        calls = _forwards(model)
        ltmp_core.calibrate_to_flops(model, x, 0.58, near=near)
        solved[near] = len(calls), _measured(model, x)
    (full, r_full), (near, r_near) = solved[None], solved[1e-2]
    assert 0.58 - 0.01 <= r_full <= 0.58 and 0.58 - 0.01 <= r_near <= 0.58
    assert near < full, solved
    with pytest.raises(LTMPError, match="near: must be a positive step"):
        ltmp_core.calibrate_to_flops(model, x, 0.5, near=0.0)
    with pytest.raises(ltmp_core.Unreachable, match="lowest reachable"):
        ltmp_core.calibrate_to_flops(model, x, 0.01, near=1e-2)


def test_a_shift_is_solved_for_another_measure_than_the_flops():
    """``measure``: the shift is solved for what the model's forward leaves, here the share of patch tokens that
    leave the last block (a stand-in for a latency predicted from counts). Asked for 0.3 of them, from a plan
    solved for 0.8 of the FLOPs and from near it, a fresh forward at the solved thresholds keeps at most 0.3 and
    within a few tokens of it; a share under what merging can reach is out of reach."""
    x = images(16, seed=4)
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="merge", keep=0.9).with_layers(merge_threshold=[0.0, 0.01, 0.02, 0.03])
    ltmp_core.apply_plan(model, plan, mode="static")
    g = ltmp_core.ViTGeometry.from_model(model)

    def last_share(m):
        counts = ltmp_core.token_counts(m).float()
        return float((counts[-1] - g.num_prefix_tokens).mean()) / g.num_patches

    ltmp_core.calibrate_to_flops(model, x, 0.8)
    assert last_share(model) > 0.3
    for near in (None, 1e-2):
        ltmp_core.calibrate_to_flops(model, x, 0.3, near=near, measure=last_share)
        with torch.no_grad():
            model(x)
        # The share moves in steps of 1/256 (16 images of 16 patches), several at one shift where scores tie.
        assert 0.3 - 5 / 256 <= last_share(model) <= 0.3
    # Merging removes at most half of what enters a block: 4 blocks leave at least 1/16 of the patches.
    with pytest.raises(ltmp_core.Unreachable, match="a measured value of 0.010"):
        ltmp_core.calibrate_to_flops(model, x, 0.01, measure=last_share)


def _images_forwarded(model) -> list[int]:
    counts: list[int] = []
    model.register_forward_pre_hook(lambda module, args: counts.append(int(args[0].shape[0])))
    return counts


@pytest.mark.parametrize("op", ["merge", "prune"])
@pytest.mark.parametrize("flops", [0.45, 0.7])
def test_a_solve_on_fewer_images_first_lands_in_the_same_window_on_them_all(op, flops):
    """``coarse``: solved on the first 16 of 64 images first, then on all 64 from there. The answer is solved
    on all 64: at most the target and, where a solve on all of them from the start lands within 0.2% of it,
    within 0.2% too; and it forwards fewer images than that solve."""
    x = images(64, seed=5)
    solved = {}
    for coarse in (None, 16):
        model = tiny_model("deit_small")
        ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=op, keep=0.9), mode="static")
        forwarded = _images_forwarded(model)
        ltmp_core.calibrate_to_flops(model, x, flops, coarse=coarse)
        solved[coarse] = sum(forwarded), _measured(model, x)
    (full, r_full), (fewer, r_fewer) = solved[None], solved[16]
    assert r_fewer <= flops and r_full <= flops
    if r_full >= flops * (1 - 2e-3):
        assert r_fewer >= flops * (1 - 2e-3), solved
    assert fewer < full, solved


def test_a_target_out_of_reach_leaves_the_thresholds_as_they_were_and_bad_coarse_is_refused():
    """Out of reach on every image: the same error a solve on all of them gives (its lowest ratio is that of
    all the images), thresholds as they were, also where the fewer images reached the target and all of them
    do not; ``coarse`` must be a positive count."""
    x = images(32, seed=5)
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op=["none", "none", "none", "merge"], keep=0.9).with_layers(
        merge_threshold=[None, None, None, 0.2])
    ltmp_core.apply_plan(model, plan, mode="static")
    errors = []
    for coarse in (None, 8):
        with pytest.raises(ltmp_core.Unreachable) as e:
            ltmp_core.calibrate_to_flops(model, x, 0.3, coarse=coarse)
        errors.append(e.value.lowest)
        assert ltmp_core.get_plan(model).layers[3].merge_threshold == pytest.approx(0.2)
    assert errors[0] == pytest.approx(errors[1])
    # Reached on the fewer images, out of reach on them all (a measure that reads more on the whole batch):
    # the thresholds are as they were before the first solve, not where it left them.
    merging = tiny_model("deit_small")
    ltmp_core.apply_plan(merging, ltmp_core.make_plan(merging, op="merge", keep=0.9).with_layers(
        merge_threshold=[0.1, 0.2, 0.3, 0.4]), mode="static")
    unreduced = ltmp_core.unreduced_macs(ViTGeometry.from_model(merging))

    def more_on_all(m):
        macs = ltmp_core.image_macs(m)
        return float(macs.mean()) / unreduced + (0.0 if len(macs) == 8 else 1.0)

    with pytest.raises(ltmp_core.Unreachable):
        ltmp_core.calibrate_to_flops(merging, x, 0.6, measure=more_on_all, coarse=8)
    assert [layer.merge_threshold for layer in ltmp_core.get_plan(merging).layers] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    for bad in (0, -4, 2.5):
        with pytest.raises(LTMPError, match="coarse: must be a positive number of images"):
            ltmp_core.calibrate_to_flops(model, x, 0.8, coarse=bad)


def test_calibrate_to_flops_solves_prune_thresholds_without_merges_and_says_what_is_out_of_reach():
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=["none", "prune", "none", "squeeze"], keep=0.9),
                         mode="static")
    x = images(16, seed=4)
    solved = ltmp_core.calibrate_to_flops(model, x, 0.8)
    assert solved.layers[1].prune_threshold == solved.layers[3].prune_threshold > 0
    assert _measured(model, x) <= 0.8
    one = tiny_model("deit_small")
    ltmp_core.apply_plan(one, ltmp_core.make_plan(one, op=["none", "none", "none", "merge"], keep=0.9), mode="static")
    with pytest.raises(ltmp_core.Unreachable, match=r"flops: a FLOPs ratio of 0.300 cannot be reached .* lowest") as e:
        ltmp_core.calibrate_to_flops(one, x, 0.3)
    # Merging only in the last of 4 blocks cannot take more than a quarter of the MACs away.
    assert 0.75 < e.value.lowest < 1.0 and isinstance(e.value, LTMPError)
    # The thresholds it could not solve are left as they were, so a caller may retry from them.
    before = [layer.prune_threshold for layer in solved.layers]
    with pytest.raises(ltmp_core.Unreachable):
        ltmp_core.calibrate_to_flops(model, x, 0.01)
    assert [layer.prune_threshold for layer in ltmp_core.get_plan(model).layers] == pytest.approx(before)
    # Offsets far above any importance (a shift solved before, then solved again): still solved, from below.
    ltmp_core.set_thresholds(model, "prune_threshold", [None, 1e6, None, 1e6 + 0.5])
    again = ltmp_core.calibrate_to_flops(model, x, 0.8)
    assert again.layers[3].prune_threshold - again.layers[1].prune_threshold == pytest.approx(0.5, rel=1e-3)
    assert 0.8 - 0.02 <= _measured(model, x) <= 0.8
    both = tiny_model("deit_small")
    ltmp_core.apply_plan(both, ltmp_core.make_plan(both, op="merge+prune", keep=0.9), mode="static")
    with pytest.raises(LTMPError, match=r"layers\[0\]\.prune_threshold: not set"):
        ltmp_core.calibrate_to_flops(both, x, 0.5)
