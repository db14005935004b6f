"""Search spaces with Optuna's FixedTrial and property tests: every plan lands on its target."""

from __future__ import annotations

import re

import optuna
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ltmp_core
import spaces
from ltmp_core import OPS, LayerPlan, LTMPError, ReductionPlan, ViTGeometry
from spaces._baselines import tps_layers


def geometry(name: str, **kwargs) -> ViTGeometry:
    with torch.device("meta"):
        return ViTGeometry.from_model(timm.create_model(name, pretrained=False, **kwargs))


DEIT_S = geometry("deit_small_patch16_224")
DIGITS = geometry("vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)


def fixed(ops, cuts) -> optuna.trial.FixedTrial:
    params = {f"op_{i}": op for i, op in enumerate(ops)}
    params.update({f"cut_{i}": c for i, c in enumerate(cuts)})
    return optuna.trial.FixedTrial(params)


def test_layerwise_fixed_trial_gives_that_plan_on_target():
    ops = ["none", "merge", "prune", "squeeze", "merge+prune", "merge+squeeze"] * 2
    cuts = [0.5, 0.2, 0.9, 0.4, 0.7, 1.0, 0.0, 0.3, 0.3, 0.6, 0.8, 0.1]
    plan = spaces.suggest("layerwise", fixed(ops, cuts), DEIT_S, 0.35)
    assert plan.ops == tuple(ops)
    assert plan.layers[0].keep == 1.0  # op none: its cut is ignored
    assert ltmp_core.plan_flops_ratio(plan) == pytest.approx(0.35, rel=0.005)
    # A larger cut weight means a smaller budget, among layers of the same op.
    assert plan.layers[2].keep < plan.layers[8].keep  # prune 0.9 vs prune 0.3
    assert plan.geometry == DEIT_S and plan.meta["space"] == "layerwise"


def test_layerwise_without_reducing_layers_is_infeasible_with_reason():
    with pytest.raises(spaces.Infeasible, match="cannot be reached"):
        spaces.suggest("layerwise", fixed(["none"] * 12, [1.0] * 12), DEIT_S, 0.5)
    # Merging alone can at most halve each layer: fine for 0.5 of DeiT-S, hopeless in one layer.
    with pytest.raises(spaces.Infeasible, match="lowest reachable"):
        spaces.suggest("layerwise", fixed(["merge"] + ["none"] * 11, [1.0] * 12), DEIT_S, 0.3)


def test_layerwise_only_uses_allowed_ops():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    plans = 0
    for _ in range(20):
        trial = study.ask()
        try:
            plan = spaces.suggest("layerwise", trial, DEIT_S, 0.5, ops=["none", "prune"])
        except spaces.Infeasible as e:
            assert set(e.ops) <= {"none", "prune"} and len(e.ops) == 12
            continue
        plans += 1
        seen |= set(plan.ops)
    assert plans >= 10 and seen == {"none", "prune"}, "random sampling reaches 0.5 with prune in most trials"
    with pytest.raises(LTMPError, match="unknown operation 'drop'"):
        spaces.suggest("layerwise", study.ask(), DEIT_S, 0.5, ops=["drop"])


@settings(max_examples=120, deadline=None)
@given(
    g=st.sampled_from([DEIT_S, DIGITS]),
    data=st.data(),
    target=st.floats(0.25, 0.9),
)
def test_every_layerwise_plan_lands_on_its_target(g, data, target):
    ops = data.draw(st.lists(st.sampled_from(list(OPS)), min_size=g.depth, max_size=g.depth))
    cuts = data.draw(st.lists(st.floats(0.0, 1.0), min_size=g.depth, max_size=g.depth))
    try:
        plan = spaces.suggest("layerwise", fixed(ops, cuts), g, target)
    except spaces.Infeasible as e:
        # The reason names the lowest reachable ratio, and it is real: just above it the same
        # parameters give a plan on that target.
        lowest = float(re.search(r"lowest reachable is ([0-9.]+)", str(e)).group(1))
        assert lowest > target * 0.999 and e.ops == ops
        if lowest * 1.02 < 1.0:
            above = spaces.suggest("layerwise", fixed(ops, cuts), g, lowest * 1.02)
            assert ltmp_core.plan_flops_ratio(above) == pytest.approx(lowest * 1.02, rel=0.005)
        return
    assert ltmp_core.plan_flops_ratio(plan) == pytest.approx(target, rel=0.005)


def test_ltmp_baseline_is_the_released_recipe():
    """LTMP's tools/train.py and model class: merge then prune everywhere, ToMe's order, raw mean
    attention, thresholds from 0.9 and 0, SGD at 5e-3 / 5e-6, tau 0.5, smoothing 0.1, clamp, lambda 10,
    trained through LTMP's own training forward (soft form ltmp)."""
    plan = spaces.suggest("ltmp", optuna.trial.FixedTrial({}), DEIT_S, 0.35)
    assert set(plan.ops) == {"merge+prune"}
    assert {(l.merge_order, l.importance, l.importance_scale, l.merge_threshold, l.prune_threshold)
            for l in plan.layers} == {("tome", "mean", "raw", 0.9, 0.0)}
    assert plan.meta["tuning"] == {"optimizer": "sgd", "lr": 5e-3, "lr_prune": 5e-6, "budget": "global",
                                   "budget_weight": 10.0, "smoothing": 0.1, "clamp": True, "start": "plan",
                                   "tau": 0.5, "soft_form": "ltmp"}


def test_ltmp_search_samples_the_recipe_hyperparameters_and_starts_from_the_released_ones():
    space = spaces.get_space("ltmp-search")
    seeds = space.seed_params(DEIT_S, OPS, ["mean"])
    assert seeds == [{"lr": 5e-3, "lr_prune": 5e-6, "tau": 0.5, "budget_weight": 10.0}]
    plan = spaces.suggest("ltmp-search", optuna.trial.FixedTrial(
        {"lr": 0.02, "lr_prune": 1e-5, "tau": 0.2, "budget_weight": 100.0}), DEIT_S, 0.35)
    t = plan.meta["tuning"]
    assert (t["lr"], t["lr_prune"], t["tau"], t["budget_weight"], t["optimizer"]) == (0.02, 1e-5, 0.2, 100.0, "sgd")


SMALL = geometry("vit_small_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3)  # 16 patches


def _ratio_of_counts(g, counts) -> float:
    """The predicted ratio of the all-merge plan that keeps ``counts`` patches after each layer."""
    n, layers = g.num_patches, []
    for c in counts:
        layers.append(LayerPlan(op="merge", keep=c / n))
        n = c
    return ltmp_core.plan_flops_ratio(ReductionPlan(tuple(layers), geometry=g), static=True)


@pytest.mark.parametrize(("r", "counts"), [
    (3, [13, 10, 7, 4]),  # by hand: 16 patches, 3 merged per layer
    (5, [11, 6, 3, 2]),   # 6 -> 3: at most half of the tokens merge (ToMe's cap), then 3 -> 2
])
def test_tome_baseline_merges_a_constant_count(r, counts):
    target = _ratio_of_counts(SMALL, counts)
    plan = spaces.suggest("tome", optuna.trial.FixedTrial({}), SMALL, target)
    assert plan.meta["r"] == r and plan.static_counts() == counts
    assert set(plan.ops) == {"merge"} and not spaces.get_space("tome").tune
    assert {layer.merge_order for layer in plan.layers} == {"tome"}  # ToMe's order and parity
    # Just under that ratio, ToMe needs a larger r.
    assert spaces.suggest("tome", optuna.trial.FixedTrial({}), SMALL, target * 0.999).meta["r"] > r


def test_tps_baseline_squeezes_three_evenly_spaced_layers():
    assert tps_layers(12) == [3, 6, 9]
    assert tps_layers(4) == [1, 2, 3]
    plan = spaces.suggest("tps", optuna.trial.FixedTrial({}), DEIT_S, 0.6)
    assert [i for i, op in enumerate(plan.ops) if op != "none"] == [3, 6, 9]
    assert len({plan.keeps[i] for i in (3, 6, 9)}) == 1
    # Fixed counts (TPS keeps top-k), at or just under the target.
    assert 0.59 <= ltmp_core.plan_flops_ratio(plan, static=True) <= 0.6
    assert not spaces.get_space("tps").tune
    assert {plan.layers[i].squeeze_host for i in (3, 6, 9)} == {"tps"}


def test_unknown_space_is_a_clear_error():
    with pytest.raises(LTMPError, match="unknown search space 'grid'.*layerwise"):
        spaces.suggest("grid", optuna.trial.FixedTrial({}), DEIT_S, 0.5)


def test_layerwise_samples_importance_per_layer_when_both_are_allowed():
    ops = ["prune", "squeeze", "merge+prune", "none"] * 3
    params = {**{f"op_{i}": op for i, op in enumerate(ops)}, **{f"cut_{i}": 0.5 for i in range(12)},
              **{f"imp_{i}": ("cls" if i % 2 else "mean") for i in range(12)}}
    plan = spaces.suggest("layerwise", optuna.trial.FixedTrial(params), DEIT_S, 0.5, importance=["mean", "cls"])
    assert [layer.importance for layer in plan.layers] == ["mean", "cls"] * 6
    plan = spaces.suggest("layerwise", fixed(ops, [0.5] * 12), DEIT_S, 0.5, importance=["cls"])
    assert {layer.importance for layer in plan.layers} == {"cls"}
    with pytest.raises(LTMPError, match="importance"):
        spaces.suggest("layerwise", fixed(ops, [0.5] * 12), DEIT_S, 0.5, importance=["max"])


def test_tps_baseline_scores_by_class_attention():
    plan = spaces.suggest("tps", optuna.trial.FixedTrial({}), DEIT_S, 0.6)
    assert {plan.layers[i].importance for i in (3, 6, 9)} == {"cls"}


def test_layerwise_seeds_are_the_published_shapes():
    seeds = spaces.get_space("layerwise").seed_params(DEIT_S, OPS, ["mean"])
    plans = [spaces.suggest("layerwise", optuna.trial.FixedTrial(p), DEIT_S, 0.5) for p in seeds]
    squeeze_at = ["squeeze" if i in (3, 6, 9) else "none" for i in range(12)]
    assert [list(p.ops) for p in plans] == [["merge+prune"] * 12, ["merge"] * 12, squeeze_at]
    # Equal cuts: every reducing layer gets the same budget.
    assert all(len({k for k, o in zip(p.keeps, p.ops) if o != "none"}) == 1 for p in plans)
    # Only the shapes the allowed ops can build; a space without seeds has none.
    assert len(spaces.get_space("layerwise").seed_params(DEIT_S, ["none", "squeeze"], ["mean"])) == 1
    assert spaces.get_space("ltmp").seed_params(DEIT_S, OPS, ["mean"]) == []


STRUCTURED = dict(merge=True, merge_from=1, merge_to=9, slope=0.04, order="tome", prune="squeeze", prune_from=7,
                  prune_level=0.1, host="tps", importance="cls")


def test_structured_space_builds_the_shape_by_hand():
    plan = spaces.suggest("structured", optuna.trial.FixedTrial(STRUCTURED), DEIT_S, 0.35, importance=["mean", "cls"])
    # Blocks 1-8 merge, blocks from 7 squeeze: 0 none, 1-6 merge, 7-8 merge+squeeze, 9-11 squeeze.
    assert list(plan.ops) == ["none"] + ["merge"] * 6 + ["merge+squeeze"] * 2 + ["squeeze"] * 3
    # Merge thresholds are offsets along depth (0.04 * (i / 11 - 0.5)); the trial solves one shift.
    assert plan.layers[1].merge_threshold == pytest.approx(0.04 * (1 / 11 - 0.5))
    assert plan.layers[8].merge_threshold == pytest.approx(0.04 * (8 / 11 - 0.5))
    assert {l.prune_threshold for l in plan.layers[7:]} == {0.1} and plan.layers[0].merge_threshold is None
    assert {(l.importance, l.merge_order, l.squeeze_host) for l in plan.layers} == {("cls", "tome", "tps")}
    assert plan.meta["tuning"] == {"start": "solve"}
    # Without merges the prune thresholds are the ones solved: their offsets are 0.
    plan = spaces.suggest("structured", optuna.trial.FixedTrial({**STRUCTURED, "merge": False, "prune_from": 3}),
                          DEIT_S, 0.5, importance=["mean", "cls"])
    assert list(plan.ops) == ["none"] * 3 + ["squeeze"] * 9 and {l.prune_threshold for l in plan.layers[3:]} == {0.0}


def test_structured_space_refuses_shapes_that_cannot_reach_the_target_before_any_work():
    late = {**STRUCTURED, "merge_from": 6, "merge_to": 7, "prune": "none"}  # one merging block: at best ~0.7
    with pytest.raises(spaces.Infeasible, match="lowest reachable") as e:
        spaces.suggest("structured", optuna.trial.FixedTrial(late), DEIT_S, 0.35, importance=["mean", "cls"])
    assert e.value.ops.count("merge") == 1
    with pytest.raises(spaces.Infeasible, match="does not allow"):
        spaces.suggest("structured", optuna.trial.FixedTrial(STRUCTURED), DEIT_S, 0.35, ops=["merge", "squeeze"],
                       importance=["mean", "cls"])


def test_a_stage_stride_runs_only_every_kth_reducing_block():
    # STRUCTURED reduces in blocks 1-11 (block 0 none). Stride 2: blocks 1, 3, 5, 7, 9, 11 keep their ops;
    # stride 3: blocks 1, 4, 7, 10. The thresholds of the running blocks are those of stride 1.
    every = spaces.suggest("structured", optuna.trial.FixedTrial({**STRUCTURED, "stage_stride": 1}), DEIT_S, 0.5,
                           importance=["mean", "cls"], max_stride=3)
    for stride, running in ((2, [1, 3, 5, 7, 9, 11]), (3, [1, 4, 7, 10])):
        plan = spaces.suggest("structured", optuna.trial.FixedTrial({**STRUCTURED, "stage_stride": stride}), DEIT_S,
                              0.5, importance=["mean", "cls"], max_stride=3)
        assert [i for i, op in enumerate(plan.ops) if op != "none"] == running
        assert [plan.ops[i] for i in running] == [every.ops[i] for i in running]
        assert [plan.layers[i].merge_threshold for i in running] == [every.layers[i].merge_threshold for i in running]
        # Fewer stages reach the same target by cutting harder where they run.
        assert min(plan.layers[i].keep for i in running) < min(every.layers[i].keep for i in running)
    # The stride is sampled only when asked for: a study without it keeps its nine parameters.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    spaces.suggest("structured", study.ask(), DEIT_S, 0.9)
    trial = study.ask()
    spaces.suggest("structured", trial, DEIT_S, 0.9, max_stride=3)
    assert "stage_stride" not in study.trials[0].params and 1 <= trial.params["stage_stride"] <= 3
    with pytest.raises(LTMPError, match="cannot sample fewer reduction stages"):
        spaces.suggest("layerwise", study.ask(), DEIT_S, 0.5, max_stride=2)


def test_structured_seeds_are_ltmp_tome_and_tps_shapes():
    seeds = spaces.get_space("structured").seed_params(DEIT_S, OPS, ["mean", "cls"])
    plans = [spaces.suggest("structured", optuna.trial.FixedTrial(p), DEIT_S, 0.5, importance=["mean", "cls"])
             for p in seeds]
    assert [list(p.ops) for p in plans] == [
        ["merge+prune"] * 12, ["merge"] * 12, ["none"] * 3 + ["squeeze"] * 9]
    assert plans[0].layers[0].importance == "mean" and plans[2].layers[3].importance == "cls"
    labels = [label for label, _ in spaces.get_space("structured").seeded(DEIT_S, OPS, ["mean", "cls"])]
    assert labels == ["LTMP shape", "ToMe shape", "TPS shape"]  # the names tables and the dashboard show for these trials


def test_registering_a_space_again_warns_and_replaces():
    original = spaces.SPACES["tps"]
    try:
        with pytest.warns(UserWarning, match="Overwriting search space 'tps'"):
            spaces.register_space("tps", budget="layer")(original.fn)
        assert spaces.SPACES["tps"].fn is original.fn
    finally:
        spaces.SPACES["tps"] = original


MNIST = geometry("vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4, mlp_ratio=4.0)
FULL = dict(mlp_keep=1.0, mlp_tilt=0.0, heads_keep=1.0, heads_tilt=0.0)


@pytest.mark.parametrize(("profile", "heads", "units"), [
    (FULL, [4] * 12, [256] * 12),
    (dict(mlp_keep=0.5, mlp_tilt=0.0, heads_keep=0.75, heads_tilt=0.0), [3] * 12, [128] * 12),
    # keep + tilt * (i / 11 - 1/2): 1 - 0.5 at block 0, 1 + 0.5 (capped) at block 11; units in steps of 8.
    # Heads: 4 * (1 - i / 11) = 4, 3.6, 3.3, 2.9, 2.5, 2.2, 1.8, 1.45, 1.1, 0.7, 0.4, 0 -> at least 1.
    (dict(mlp_keep=1.0, mlp_tilt=1.0, heads_keep=0.5, heads_tilt=-1.0),
     [4, 4, 3, 3, 3, 2, 2, 1, 1, 1, 1, 1],
     [128, 152, 176, 200, 224, 248, 256, 256, 256, 256, 256, 256]),
    # Units: 8 * round(32 * (0.75 - i / 11)) = 8 * (24, 21.1, 18.2, 15.3, 12.4, 9.5, 6.5, 3.6, 0.7, <0 ...).
    (dict(mlp_keep=0.25, mlp_tilt=-1.0, heads_keep=0.25, heads_tilt=0.0), [1] * 12,
     [192, 168, 144, 120, 96, 72, 56, 32, 8, 8, 8, 8]),
])
def test_joint_width_profile_hand_computed(profile, heads, units):
    """Heads round to whole heads (at least one), units to steps of 1/32 of the hidden width (at least one step)."""
    from spaces._joint import block_widths_of

    assert block_widths_of(MNIST, profile) == list(zip(heads, units))


def test_joint_plans_cut_width_and_land_on_the_target_with_the_tokens_solving_the_rest():
    cut = dict(mlp_keep=0.5, mlp_tilt=0.0, heads_keep=0.75, heads_tilt=0.0)
    for target in (0.35, 0.5):
        plan = spaces.suggest("joint", optuna.trial.FixedTrial({**STRUCTURED, **cut}), MNIST, target,
                              importance=["mean", "cls"])
        assert plan.widths() == [(3, 128)] * 12 and plan.meta["space"] == "joint"
        # Equal token budgets at the target, counting the narrower blocks: fewer tokens are cut than at full width.
        assert ltmp_core.plan_flops_ratio(plan) == pytest.approx(target, rel=1e-3)
        wide = spaces.suggest("structured", optuna.trial.FixedTrial(STRUCTURED), MNIST, target, importance=["mean", "cls"])
        assert ltmp_core.plan_flops_ratio(wide) == pytest.approx(target, rel=1e-3)
        assert all(a.keep >= b.keep for a, b in zip(plan.layers, wide.layers)) and plan.keeps != wide.keeps
        assert [l.op for l in plan.layers] == [l.op for l in wide.layers]


def test_joint_seeds_are_the_published_shapes_at_full_width():
    space = spaces.get_space("joint")
    labels = [label for label, _ in space.seeded(MNIST, OPS, ["mean", "cls"])]
    assert labels == ["LTMP shape", "ToMe shape", "TPS shape"]
    for params in space.seed_params(MNIST, OPS, ["mean", "cls"]):
        joint = spaces.suggest("joint", optuna.trial.FixedTrial(params), MNIST, 0.5, importance=["mean", "cls"])
        shape = {k: v for k, v in params.items() if k not in FULL}
        structured = spaces.suggest("structured", optuna.trial.FixedTrial(shape), MNIST, 0.5, importance=["mean", "cls"])
        assert not joint.cuts_width and joint.layers == structured.layers
