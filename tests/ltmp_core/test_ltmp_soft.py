"""Soft form ``ltmp``: LTMP's released training forward (ltmp_core.released).

Hand-computed cases for what the released block does differently from this project's soft mode
(split over all positions, detached fusion, overwritten masks, a prunable top patch), and
invariants against stock timm and against dynamic mode where LTMP's training and deployed forwards
agree. benchmarks/ltmp_released.py compares the whole forward with the released code itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import ltmp_core
from ltmp_core import LTMPError
from ltmp_core.masking import released_softmax, threshold_mask
from ltmp_core.reducers import Tokens
from ltmp_core.released import released_merge, released_prune, sequence
from tests.conftest import images, tiny_model

TAU = 0.1


def _sigmoid_slope(z: float) -> float:
    s = 1 / (1 + math.exp(-z))
    return s * (1 - s)


def _hand_tokens() -> Tokens:
    """A class token and six patches; patch 3 and patch 6 were removed by an earlier block.

    Similarity features are unit vectors in 3-D. Position 2 (a source: even place) is 0.9-similar to
    position 1 (a destination); position 4's best live destination is 0.3-similar; position 6, dead,
    would match position 5 exactly if it counted.
    """
    e = torch.eye(3)
    u = torch.tensor([0.9, math.sqrt(1 - 0.81), 0.0])
    w = torch.tensor([0.0, 0.3, math.sqrt(1 - 0.09)])
    metric = torch.stack([e[2], e[0], u, e[1], w, e[1], e[1]]).unsqueeze(0)
    x = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2).requires_grad_()  # features carry gradients
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    alive = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    importance = torch.tensor([[math.inf, 0.1, 0.3, 0.05, 0.2, 0.15, 0.02]])
    return Tokens(x=x, size=size, alive=alive, metric=metric, importance=importance, num_prefix=1)


def test_merge_by_hand():
    t = _hand_tokens()
    theta = torch.tensor(0.5, requires_grad=True)
    out = released_merge(t, lambda s: threshold_mask(s, theta, TAU))
    # Sources are positions 0, 2, 4, 6 (the dead one too); only 2 clears 0.5 (0.9), into position 1.
    assert out.alive.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    x = t.x[0].detach()
    assert torch.allclose(out.x[0, 1], (x[1] * 1 + x[2] * 2) / 3)
    assert out.size.tolist() == [[1.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]]
    assert torch.equal(out.x[0, [0, 2, 3, 4, 5, 6]], x[[0, 2, 3, 4, 5, 6]])  # the merged source stays, masked
    assert out.importance[0, 1] == pytest.approx(0.3)  # the largest of its own and its source's
    # The sequence becomes every source, then every destination.
    assert sequence(out).tolist() == [[0, 2, 4, 6, 1, 3, 5]]
    # Fusion is detached: the merged token carries no gradient to the threshold ...
    (g_x,) = torch.autograd.grad(out.x[0, 1].sum(), theta, allow_unused=True, retain_graph=True)
    assert g_x is None or float(g_x) == 0.0
    # ... the merged source's mask, 1 - sigmoid((0.9 - theta) / tau), does.
    (g,) = torch.autograd.grad(out.alive[0, 2], theta)
    assert float(g) == pytest.approx(_sigmoid_slope((0.9 - 0.5) / TAU) / TAU, rel=1e-5)


def test_second_merge_alternates_over_dead_tokens():
    """After the first merge every destination place holds a dead token: nothing can merge, even
    tokens with identical features (the project's split over live tokens would pair them)."""
    t = _hand_tokens()
    out = released_merge(t, lambda s: threshold_mask(s, torch.tensor(0.5), TAU))
    same = torch.tensor([1.0, 0.0, 0.0])
    out.metric = out.metric.clone()
    out.metric[0, [1, 4, 5]] = same
    again = released_merge(out, lambda s: threshold_mask(s, torch.tensor(0.5), TAU))
    assert again.alive.tolist() == out.alive.tolist()
    assert sequence(again).tolist() == [[0, 4, 1, 5, 2, 6, 3]]


def test_prune_overwrites_masks_and_may_take_the_top_patch():
    t = _hand_tokens()
    merge_theta = torch.tensor(0.5, requires_grad=True)
    prune_theta = torch.tensor(0.35, requires_grad=True)
    merged = released_merge(t, lambda s: threshold_mask(s, merge_theta, TAU))
    out = released_prune(merged, lambda s: threshold_mask(s, prune_theta, TAU))
    # Every live patch is below 0.35, the most important one (position 1: 0.3 after the merge) too.
    assert out.alive.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    # A pruned token's mask is its prune mask alone: no gradient of the merge threshold.
    g_merge, g_prune = torch.autograd.grad(out.alive[0, 4], (merge_theta, prune_theta), allow_unused=True,
                                           retain_graph=True)
    assert g_merge is None or float(g_merge) == 0.0
    assert float(g_prune) == pytest.approx(-_sigmoid_slope((0.2 - 0.35) / TAU) / TAU, rel=1e-5)
    # A token merged earlier keeps its merge mask (and its gradient); the class token stays.
    (g,) = torch.autograd.grad(out.alive[0, 2], merge_theta)
    assert float(g) == pytest.approx(_sigmoid_slope((0.9 - 0.5) / TAU) / TAU, rel=1e-5)


def test_released_softmax_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0)]])
    out = released_softmax(logits, torch.tensor([[1.0, 0.0]]))
    eps = 1e-5
    # Shifted by the largest logit, the masked one included: exp(0 - log 2) = 0.5.
    assert out.tolist()[0] == pytest.approx([(0.5 + eps / 2) / (0.5 + eps), (eps / 2) / (0.5 + eps)], rel=1e-6)


def _plan(model, **layer):
    plan = ltmp_core.make_plan(model, op=layer.pop("op", "merge+prune"), keep=0.7, merge_order="tome",
                               importance_scale="raw", tau=0.5, **layer)
    return plan


def test_removing_nothing_is_stock_timm():
    model = tiny_model("deit_small")
    x = images(4)
    with torch.no_grad():
        expected = model(x)
    plan = _plan(model).with_layers(merge_threshold=[1.5] * 4, prune_threshold=[0.0] * 4)
    ltmp_core.apply_plan(model, plan, mode="soft", soft_form="ltmp")
    with torch.no_grad():
        got = model(x)
    assert ltmp_core.token_counts(model).tolist() == [[17.0] * 4] * 5
    # Only LTMP's softmax epsilon (1e-5) separates the two.
    assert torch.allclose(got, expected, atol=1e-4)


def test_one_reducing_block_matches_dynamic_mode():
    """With one reducing block (the first), LTMP's training forward and its deployed one agree: the
    soft form keeps and merges the tokens that dynamic mode keeps and merges."""
    model = tiny_model("deit_small")
    x = images(4)
    ops = ["merge+prune", "none", "none", "none"]
    plan = ltmp_core.make_plan(model, op=ops, keep=[0.7, 1, 1, 1], merge_order="tome", importance_scale="raw")
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, x)
    ltmp_core.set_mode(model, "dynamic")
    with torch.no_grad():
        hard = model(x)
    counts = ltmp_core.token_counts(model)
    assert (counts[1] < 17).all() and (counts[1] > 2).all()
    ltmp_core.set_mode(model, "soft", soft_form="ltmp")
    with torch.no_grad():
        soft = model(x)
    assert ltmp_core.token_counts(model).tolist() == counts.tolist()
    assert torch.allclose(soft, hard, atol=1e-4)


def test_gradients_reach_every_threshold():
    model = tiny_model("deit_small")
    x, y = images(4), torch.arange(4)
    plan = _plan(model)
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, x)
    ltmp_core.set_mode(model, "soft", soft_form="ltmp")
    model.requires_grad_(False)
    params = ltmp_core.threshold_parameters(model)
    for p in params:
        p.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), y) + ltmp_core.flops_budget_loss(model, 0.4)
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g) and float(g) != 0.0 for g in grads)
    assert ltmp_core.get_soft_form(model) == "ltmp"


def test_soft_form_choices():
    model = tiny_model("deit_small")
    plan = _plan(model).with_layers(merge_threshold=[0.9] * 4, prune_threshold=[0.0] * 4)
    ltmp_core.apply_plan(model, plan, mode="soft")
    assert ltmp_core.get_soft_form(model) == "project"
    with pytest.raises(LTMPError, match="soft_form"):
        ltmp_core.set_mode(model, "soft", soft_form="released")
    keep_order = plan.with_layers(merge_order=["keep"] * 4)
    with pytest.raises(LTMPError, match="merge_order"):
        ltmp_core.apply_plan(tiny_model("deit_small"), keep_order, mode="soft", soft_form="ltmp")
    squeeze = ltmp_core.make_plan(model, op="squeeze", keep=0.7, importance_scale="raw").with_layers(
        prune_threshold=[0.0] * 4)
    with pytest.raises(LTMPError, match="squeeze"):
        ltmp_core.apply_plan(tiny_model("deit_small"), squeeze, mode="soft", soft_form="ltmp")
    # The form is the model's until changed; the hard modes do not depend on it.
    ltmp_core.set_mode(model, "soft", soft_form="ltmp")
    ltmp_core.set_mode(model, "dynamic")
    assert ltmp_core.get_soft_form(model) == "ltmp"
