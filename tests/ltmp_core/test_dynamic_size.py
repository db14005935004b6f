"""Models built with ``dynamic_img_size=True`` run at other sizes than they were built at: the token
grid follows the input, and so must every FLOP figure, static count and calibration (issue 27)."""

from __future__ import annotations

import pytest
import timm
import torch

import ltmp_core
from ltmp_core import LTMPError
from tests.conftest import counted_macs, images, tiny_model

BUILT, OTHER = 32, 48  # 16 patches at the size the model was built at, 36 at the other


def dynamic_model(arch: str = "deit_small", **overrides) -> torch.nn.Module:
    return tiny_model(arch, dynamic_img_size=True, **overrides)


@pytest.mark.parametrize("arch", ["deit_small", "reg4_dinov2", "avg_pool"])
@pytest.mark.parametrize("size", [BUILT, OTHER, (40, 56)], ids=str)
def test_count_flops_of_a_stock_model_follows_the_image_size(arch, size):
    model = dynamic_model(arch)
    h, w = (size, size) if isinstance(size, int) else size
    assert ltmp_core.count_flops(model, img_size=size) == counted_macs(model, torch.randn(1, 3, h, w))


@pytest.mark.parametrize("op", ["merge", "prune+", "squeeze", "merge+prune", "merge+squeeze"])
def test_a_static_plan_keeps_its_budgets_of_the_tokens_the_input_has(op):
    op = op.rstrip("+")
    model = dynamic_model()
    plan = ltmp_core.make_plan(model, op=op, keep=0.7)
    ltmp_core.apply_plan(model, plan, mode="static")
    x = images(2, size=OTHER)
    with torch.no_grad():
        model(x)
    counts = ltmp_core.token_counts(model)[:, 0].tolist()
    patches = (OTHER // 8) ** 2
    assert counts == [1 + patches] + [1 + n for n in plan.static_counts(patches)]
    assert counts[1] == 1 + ltmp_core.kept_count(0.7, patches)  # kept_count of the actual 36, not of 16
    assert ltmp_core.count_flops(model, img_size=OTHER) == pytest.approx(counted_macs(model, x[:1]), rel=1e-6)
    assert ltmp_core.plan_flops_ratio(plan, static=True, img_size=OTHER) == pytest.approx(
        ltmp_core.count_flops(model, img_size=OTHER) / ltmp_core.count_flops(dynamic_model(), img_size=OTHER))
    assert float(ltmp_core.image_macs(model)[0]) == ltmp_core.count_flops(model, img_size=OTHER)


def test_measured_flops_are_those_of_the_images_size():
    model = dynamic_model()
    x = images(3, size=OTHER)
    mean, kept = ltmp_core.measure_flops(model, [x])
    assert mean == counted_macs(model, x[:1])
    assert kept == [1 + 36.0] * 4
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.8)
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8, size=OTHER))
    ltmp_core.set_mode(model, "dynamic")
    measured, _ = ltmp_core.measure_flops(model, [x[i:i + 1] for i in range(3)])
    assert measured == pytest.approx(sum(counted_macs(model, x[i:i + 1]) for i in range(3)) / 3, rel=0.01)


def test_calibrate_to_flops_measures_ratios_at_the_size_of_its_images():
    model = dynamic_model()
    plan = ltmp_core.make_plan(model, op="merge", keep=0.9)
    ltmp_core.apply_plan(model, plan, mode="static")
    x = images(8, size=64)  # 64 patches per image against the 16 the model was built for
    ltmp_core.calibrate_to_flops(model, x, 0.5)
    with torch.no_grad():
        model(x)
    stock = counted_macs(dynamic_model(), x[:1])
    ratio = float(ltmp_core.image_macs(model).mean()) / stock
    assert 0.49 <= ratio <= 0.5
    assert float(ltmp_core.expected_flops_ratio(model)) == pytest.approx(ratio, rel=0.01)  # of the mean counts
    assert float(ltmp_core.token_counts(model)[-1].mean()) < 40  # of 65: really reduced


def test_a_model_of_one_size_refuses_another_in_one_line():
    model = tiny_model("deit_small")
    assert ltmp_core.count_flops(model, img_size=BUILT) == ltmp_core.count_flops(model)
    with pytest.raises(LTMPError, match=r"^img_size: .*dynamic_img_size=True") as info:
        ltmp_core.count_flops(model, img_size=OTHER)
    assert "\n" not in str(info.value)


def test_the_geometry_at_another_size_is_the_model_built_at_it():
    built = ltmp_core.ViTGeometry.from_model(tiny_model("deit_small", img_size=OTHER))
    assert ltmp_core.ViTGeometry.from_model(dynamic_model()).at_size(OTHER) == built
    assert ltmp_core.model_geometry(dynamic_model(), OTHER) == built


def test_dinov2_built_at_518_counts_what_it_runs_at_224():
    """Full size on the meta device: the figure is the size it runs at, not the size it was built at."""
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True)
    at_224 = counted_macs(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert ltmp_core.count_flops(model, img_size=224) == at_224
    assert ltmp_core.count_flops(model) > 5 * at_224  # 1,370 tokens at 518 px against 257
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.8)
    ltmp_core.apply_plan(model, plan, mode="static")
    assert ltmp_core.count_flops(model, img_size=224) == pytest.approx(
        counted_macs(model, torch.empty(1, 3, 224, 224, device="meta")), rel=1e-6)
