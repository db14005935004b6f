"""benchmarks/selection_criteria.py: its scores against torch's own losses, its picks and cross-fitting on
cases worked out by hand (no study is run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("selection_criteria", ROOT / "benchmarks" / "selection_criteria.py")
sc = sys.modules["selection_criteria"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sc)


def test_the_scores_are_torchs_cross_entropy_kl_divergence_and_argmax_agreement():
    g = torch.Generator().manual_seed(0)
    logits, base_logits = torch.randn(50, 10, generator=g), torch.randn(50, 10, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    s = sc.per_image_scores(F.log_softmax(logits, -1), y, F.log_softmax(base_logits, -1))
    assert s["nll"].mean() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(base_logits, -1), log_target=True, reduction="batchmean")
    assert s["kl"].mean() == pytest.approx(kl.item(), rel=1e-6)
    assert s["top1"].mean() == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert s["agree"].mean() == pytest.approx((logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item())
    same = sc.per_image_scores(F.log_softmax(base_logits, -1), y, F.log_softmax(base_logits, -1))
    assert np.abs(same["kl"]).max() < 1e-6 and same["agree"].min() == 1.0


def _trial(top1, nll=None, kl=None):
    top1 = np.asarray(top1, dtype=float)
    return {"top1": top1, "agree": top1, "nll": np.asarray(nll if nll is not None else 1 - top1, dtype=float),
            "kl": np.asarray(kl if kl is not None else 1 - top1, dtype=float)}


def test_a_pick_reads_each_criterion_the_right_way_up_and_ties_go_to_the_earlier_trial():
    a = _trial([1, 1, 0, 0], nll=[0.1, 0.1, 2.0, 2.0], kl=[0.3, 0.3, 0.3, 0.3])
    b = _trial([1, 1, 1, 0], nll=[0.5, 0.5, 0.5, 3.0], kl=[0.1, 0.1, 0.1, 0.1])
    c = _trial([1, 1, 1, 0], nll=[2.0, 2.0, 2.0, 2.0], kl=[0.2, 0.2, 0.2, 0.2])
    trials = [a, b, c]
    assert sc.pick(trials, "top1") == 1  # b and c tie at 3/4: the earlier
    assert sc.pick(trials, "nll") == 0  # mean 1.05 against 1.125 and 2.0
    assert sc.pick(trials, "kl") == 1
    assert sc.pick(trials, "top1", np.array([0, 1])) == 0  # all three right on these two: the first


def test_cross_fitting_scores_the_pick_on_the_images_it_did_not_see():
    rng = np.random.default_rng(1)
    strong = _trial((rng.random(400) < 0.9).astype(float))
    weak = _trial((rng.random(400) < 0.5).astype(float))
    # A trial better on every half is picked on every half: the cross-fit is its own top-1 (each image is
    # judged once per halving, in one half or the other).
    assert sc.crossfit([weak, strong], "top1", splits=30, seed=0) == pytest.approx(strong["top1"].mean())
    # A criterion that prefers the weak trial everywhere is read at the weak trial's top-1.
    backwards = _trial(weak["top1"], kl=np.zeros(400))
    assert sc.crossfit([backwards, _trial(strong["top1"], kl=np.ones(400))], "kl", splits=30, seed=0) == \
        pytest.approx(weak["top1"].mean())


def test_cross_fitting_has_no_winners_curse_among_equal_trials():
    # 20 trials, each right on any image with chance 0.7, independently: equal in truth. Over 40 such data
    # sets of 400 images, the best trial on all images averages well above 0.7 (the winner's curse); read
    # on the half that did not choose it, it averages 0.7 (standard error of that mean about 0.003).
    rng = np.random.default_rng(2)
    best, held = [], []
    for d in range(40):
        trials = [_trial((rng.random(400) < 0.7).astype(float)) for _ in range(20)]
        best.append(max(t["top1"].mean() for t in trials))
        held.append(sc.crossfit(trials, "top1", splits=10, seed=d))
    assert np.mean(best) > 0.725
    assert abs(np.mean(held) - 0.7) < 0.012


def test_the_ceiling_is_the_best_test_top1_among_feasible_trials_and_the_pick_the_best_on_select():
    def trial(seed, number, feasible, top1, test):
        return {"kind": "trial", "proxy": "p", "flops_target": 0.35, "seed": seed, "trial": number,
                "feasible": feasible, "top1": top1, "test_top1": test}

    rows = [
        trial(0, 0, True, 0.80, 0.79),
        trial(0, 1, True, 0.82, 0.78),   # best on select: the study's pick
        trial(0, 2, False, 0.90, 0.95),  # over the FLOPs target: never a candidate, not even for the ceiling
        trial(0, 3, True, 0.82, 0.81),   # ties trial 1 on select (the earlier is picked); best on test
        trial(0, 4, True, 0.70, 0.81),   # ties trial 3 on test: the earlier stays the ceiling
        trial(1, 0, True, 0.60, 0.61),
        {"kind": "criterion", "proxy": "p", "flops_target": 0.35, "seed": 0, "criterion": "top1"},
    ]
    got = sc.ceiling(rows)
    assert got == [
        {"proxy": "p", "flops_target": 0.35, "sampler": "tpe", "seed": 0, "candidates": 4, "picked_trial": 1, "picked_test_top1": 0.78,
         "ceiling_trial": 3, "ceiling_test_top1": 0.81},
        {"proxy": "p", "flops_target": 0.35, "sampler": "tpe", "seed": 1, "candidates": 1, "picked_trial": 0, "picked_test_top1": 0.61,
         "ceiling_trial": 0, "ceiling_test_top1": 0.61},
    ]
