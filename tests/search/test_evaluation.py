"""Per-image correctness from :func:`evaluate` (for paired comparisons), against stock timm and images run alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import ltmp_core
from ltmp_core import LTMPError
from search.setup.evaluation import evaluate, pack_correct, unpack_correct
from tests.conftest import images, tiny_model

CPU = torch.device("cpu")


def labelled(logits: torch.Tensor, wrong: list[int]) -> torch.Tensor:
    """Labels equal to the argmax of ``logits`` except at the ``wrong`` positions."""
    labels = logits.argmax(dim=-1).clone()
    labels[wrong] = (labels[wrong] + 1) % logits.shape[-1]
    return labels


def test_per_image_of_a_none_plan_is_stock_timm_argmax_against_labels():
    stock = tiny_model("deit_small")
    x = images(10, seed=3)
    with torch.no_grad():
        reference = stock(x)
    y = labelled(reference, wrong=[1, 4, 5, 9])
    model = copy.deepcopy(stock)
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="none"), mode="dynamic")
    result = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], device=CPU, per_image=True)
    expected = torch.tensor([True, False, True, True, False, False, True, True, True, False])
    assert torch.equal(result.correct, expected)
    assert torch.equal(result.correct, reference.argmax(dim=-1) == y)
    assert result.accuracy == pytest.approx(float(result.correct.float().mean())) == 0.6


def test_per_image_of_a_reducing_plan_is_each_image_run_alone():
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=["merge+prune", "merge", "squeeze", "prune"],
                                                    keep=[0.6, 0.8, 0.7, 0.7]), mode="static")
    ltmp_core.calibrate(model, images(32, seed=2))
    ltmp_core.set_mode(model, "dynamic")
    x = images(12, seed=5)
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1]) for i in range(12)])
    y = labelled(alone, wrong=[0, 2, 3, 7, 11])
    result = evaluate(model, [(x[:5], y[:5]), (x[5:], y[5:])], device=CPU, per_image=True)
    assert result.correct.tolist() == [i not in (0, 2, 3, 7, 11) for i in range(12)]
    assert result.accuracy == pytest.approx(7 / 12)


def test_no_per_image_unless_asked():
    model = tiny_model("deit_small")
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="none"), mode="dynamic")
    x = images(4)
    assert evaluate(model, [(x, torch.zeros(4, dtype=torch.long))], device=CPU).correct is None


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_round_trips(n):
    bits = np.random.default_rng(n).random(n) < 0.5
    packed = pack_correct(torch.from_numpy(bits))
    assert packed.isascii() and np.array_equal(unpack_correct(packed, n), bits)


def test_pack_layout_is_the_first_image_in_the_lowest_bit():
    assert pack_correct([True] + [False] * 7 + [False, True]) == "AQI="  # bytes 0x01, 0x02
    with pytest.raises(LTMPError, match="do not hold"):
        unpack_correct("AQI=", 17)


@pytest.mark.slow
def test_validate_per_image_is_the_test_split_in_a_fixed_order():
    """``validate_plan(per_image=True)`` on the embedded default: the vector's mean is the reported top-1, and
    two plans scored on the test split are paired image by image (the same images in the same order)."""
    from search.deploy.validate import validate_plan
    from search.setup.config import resolve
    from search.setup.workbench import Workbench

    config = resolve("mnist", {"flops": 0.35})
    geometry = Workbench.open(config).geometry
    merge = ltmp_core.make_plan(geometry, op="merge", keep=0.8)
    none = ltmp_core.make_plan(geometry, op="none")
    results = [validate_plan(p, config, split="test", mode="static", per_image=True) for p in (merge, none, merge)]
    vectors = [unpack_correct(r["correct"], r["images"]) for r in results]
    for result, vector in zip(results, vectors):
        assert len(vector) == result["images"] == 1000 and vector.mean() == pytest.approx(result["top1"])
    assert np.array_equal(vectors[0], vectors[2])
    # The unpatched base on the same split, image by image: the 'none' plan is the base model.
    assert results[1]["top1"] == pytest.approx(results[1]["base_top1"])
