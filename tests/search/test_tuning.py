"""Threshold tuning: weights never change, the budget holds, a non-finite loss is caught."""

from __future__ import annotations

import itertools

import pytest
import torch

import ltmp_core
from search.setup.evaluation import evaluate
from search.study.tuning import NonFiniteLoss, Recipe, tune_thresholds
from spaces import LTMP_TUNING
from tests.conftest import images, tiny_model

CPU = torch.device("cpu")


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def calibrated(ops=("merge+prune", "merge", "squeeze", "prune"), keep=(0.6, 0.8, 0.7, 0.7)):
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=list(ops), keep=list(keep)), mode="static")
    ltmp_core.calibrate(model, images(32, seed=2))
    return model


def ratio(model) -> float:
    held = [(images(16, seed=9), torch.zeros(16, dtype=torch.long))]
    return evaluate(model, held, device=CPU).macs / ltmp_core.unreduced_macs(ltmp_core.ViTGeometry.from_model(model))


def test_tuning_changes_thresholds_only():
    model = calibrated()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "threshold" not in k}
    before = [float(p.detach()) for p in ltmp_core.threshold_parameters(model)]
    tune_thresholds(model, batches(), recipe=Recipe(steps=5, lr=0.5, budget="layer", budget_weight=10.0), target=0.5,
                    device=CPU)
    after = [float(p.detach()) for p in ltmp_core.threshold_parameters(model)]
    assert before != after
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert all(p.grad is None for n, p in model.named_parameters() if "threshold" not in n)


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_tuning_brings_loosened_thresholds_back_in_units_of_score_spread(budget):
    """A random model's scores sit close together (similarities near 1, importances near 1): moving
    a threshold by a fixed amount would remove everything or nothing, so steps are in units of each
    threshold's own score spread. Loosen every threshold by one unit; tuning must walk the FLOPs
    back toward the budget without overshooting it."""
    model = calibrated()
    scales = ltmp_core.threshold_scales(model)
    assert min(scales) < 0.05, "this model's scores are compressed"
    start = ratio(model)
    with torch.no_grad():  # a token merges above its threshold and is pruned below it: both keep more
        for (_, name, p), s in zip(ltmp_core.thresholds(model), scales):
            p += s if name == "merge_threshold" else -s
    loose = ratio(model)
    assert loose > start + 0.1
    tune_thresholds(model, batches(), recipe=Recipe(steps=10, lr=0.05, budget=budget, budget_weight=1000.0),
                    target=start, device=CPU)
    assert start - 0.03 <= ratio(model) <= loose - 0.05


def test_non_finite_loss_is_reported():
    model = calibrated()
    bad = ((torch.full((4, 3, 32, 32), float("nan")), torch.zeros(4, dtype=torch.long)) for _ in itertools.count())
    with pytest.raises(NonFiniteLoss, match="tuning loss is nan at step 1"):
        tune_thresholds(model, bad, recipe=Recipe(steps=3, budget_weight=1.0), target=0.5, device=CPU)


def test_evaluate_restores_mode_and_counts_each_image_alone():
    model = calibrated()
    ltmp_core.set_mode(model, "soft")
    model.train()
    x = images(6, seed=4)
    result = evaluate(model, [(x[:3], torch.zeros(3, dtype=torch.long)), (x[3:], torch.zeros(3, dtype=torch.long))],
                      device=CPU)
    assert ltmp_core.get_mode(model) == "soft" and model.training
    ltmp_core.set_mode(model, "dynamic")
    alone, _ = ltmp_core.measure_flops(model, [x[i:i + 1] for i in range(6)])
    assert result.macs == pytest.approx(alone) and result.images == 6


def test_one_ltmp_sgd_step_is_the_released_recipe_written_out():
    """LTMP's tools/train.py, one step: loss = label-smoothed CE + 10 * (target - r_flops)^2; plain SGD
    (no momentum) at 5e-3 for merge and 5e-6 for prune thresholds; then every threshold clamped to [0, 1]."""
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.7, merge_order="tome", importance_scale="raw", tau=0.5)
    plan = plan.with_layers(merge_threshold=[0.9, 0.95, 0.99, 1.0], prune_threshold=[0.0, 0.02, 0.05, 0.03])
    ltmp_core.apply_plan(model, plan, mode="soft")
    by_hand = ltmp_core.apply_plan(tiny_model("deit_small"), plan, mode="soft", soft_form="ltmp")
    x, y = next(batches(3))
    # By hand, on the twin model.
    loss = torch.nn.functional.cross_entropy(by_hand(x), y, label_smoothing=0.1)
    loss = loss + 10.0 * (0.4 - ltmp_core.expected_flops_ratio(by_hand)) ** 2
    params = dict(by_hand.named_parameters())
    names = [n for n in params if n.endswith(("merge_threshold", "prune_threshold"))]
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    expected = {n: min(1.0, max(0.0, float(params[n].detach()) - (5e-3 if "merge" in n else 5e-6) * float(g)))
                for n, g in zip(names, grads)}
    # The recipe, one step of the same batch.
    tune_thresholds(model, iter([(x, y)]), recipe=Recipe(steps=1, **LTMP_TUNING), target=0.4, device=CPU)
    got = {n: float(p) for n, p in model.named_parameters() if n in expected}
    assert got == pytest.approx(expected, abs=1e-7)
    assert any(float(g) != 0 for g in grads) and got["blocks.3.merge_threshold"] <= 1.0


def test_soft_form_is_a_recipe_setting():
    with pytest.raises(ltmp_core.LTMPError, match="soft_form"):
        Recipe(soft_form="released")
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.7, merge_order="tome", importance_scale="raw", tau=0.5)
    ltmp_core.apply_plan(model, plan.with_layers(merge_threshold=[0.9] * 4, prune_threshold=[0.0] * 4), mode="dynamic")
    tune_thresholds(model, batches(2), recipe=Recipe(steps=1, soft_form="ltmp"), target=0.5, device=CPU)
    assert ltmp_core.get_soft_form(model) == "ltmp"
