"""The FLOP model against PyTorch's counter on every path a reduction runs, within 0.1%.

The reducers run in three forms (:data:`ltmp_core.FORMS`), and their similarity products cost
differently in each:

- static: hard-static mode through the stages' fast forms (what a deployed plan runs): a merge
  compares its sources with its destinations, a squeeze its pruned tokens with the kept ones, and a
  stage with nothing to remove compares nothing;
- masked: hard-static mode through the masked reducers (the fast forms taken out of the registry),
  the reducers that soft mode trains and dynamic mode runs: every pair of the block's sequence;
- dynamic: thresholds decide, image by image, through the masked reducers;
- soft: the differentiable budget term of a soft pass is the counter's figure for the hard pass it
  stands for (dynamic mode on the same image).

The reference is :func:`tests.flop_reference.counted_macs` (PyTorch's counter with the textbook
formula for SDPA kernels, guarded in test_flop_reference.py), never the model's own formula. Static
and masked paths run full-size models on the meta device; dynamic and soft paths must compute, so
they run narrow models (4 blocks, width 48) at the full-size models' token counts.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import timm
import torch

import ltmp_core
from tests.conftest import counted_macs, images

#: (timm name, kwargs, image size): one prefix token at 197, two (distillation, an even prefix: the
#: other parity of a ToMe-order split) at 198, and five (class and four registers) at 1,374 tokens.
ARCHS = {
    "deit_small": ("deit_small_patch16_224", {}, 224),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {}, 224),
    "dinov2_reg4_518": ("vit_small_patch14_reg4_dinov2", {"img_size": 518, "init_values": 0.1}, 518),
}
OPS = ["merge", "prune", "squeeze", "merge+prune", "merge+squeeze"]
#: Uneven budgets, two layers that keep everything (static stages with nothing to remove).
KEEPS = [0.9, 1.0, 0.8, 0.95, 0.7, 0.85, 1.0, 0.75, 0.9, 0.6, 0.8, 0.7]
#: The published variants and a mix of every op: LTMP's units, ToMe's order, TPS's squeeze
#: (feature similarity, embed_dim wide), cls importance (its query's row computed apart).
VARIANTS = {
    "cls": dict(op=["prune", "squeeze", "merge+prune", "merge+squeeze"] * 3, keep=KEEPS, importance="cls"),
    "tome_tps": dict(op=["merge", "merge+squeeze", "squeeze", "merge+prune"] * 3, keep=KEEPS, merge_order="tome",
                     squeeze_host="tps", importance_scale="raw"),
    "mixed": dict(op=["none", "merge", "prune", "squeeze", "merge+prune", "merge+squeeze"] * 2, keep=0.7,
                  merge_keep=[None, None, None, None, 0.9, 1.0] * 2),
}
BOUND = 1e-3


def full_size(arch: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A full-size model on the meta device (shapes without memory or compute) and an image for it."""
    name, kwargs, px = ARCHS[arch]
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model, torch.empty(1, 3, px, px, device="meta")


def without_fast_forms(monkeypatch) -> None:
    """Static mode then runs the masked reducers with top-k counts (as for a stage without a fast form)."""
    for name, stage in list(ltmp_core.REDUCERS.items()):
        monkeypatch.setitem(ltmp_core.REDUCERS, name, dataclasses.replace(stage, static=None))


def static_case(arch: str, plan_kwargs: dict, path: str, monkeypatch) -> tuple[float, float]:
    """``(count_flops, counter)`` of a full-size static plan run through ``path``."""
    model, x = full_size(arch)
    plan = ltmp_core.make_plan(model, **plan_kwargs)
    if path == "masked":
        without_fast_forms(monkeypatch)
    ltmp_core.apply_plan(model, plan, mode="static")
    counted = counted_macs(model, x)
    analytic = ltmp_core.count_flops(model)
    # One count for the plan alone and for the model: the plan predicts what static mode runs.
    assert ltmp_core.plan_flops_ratio(plan, static=True) * ltmp_core.unreduced_macs(plan.geometry) == \
        pytest.approx(analytic, rel=1e-12)
    return analytic, counted


@pytest.mark.parametrize("path", ["static", "masked"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_static_plans_cost_what_the_counter_counts(arch, op, path, monkeypatch):
    analytic, counted = static_case(arch, dict(op=op, keep=KEEPS), path, monkeypatch)
    assert analytic == pytest.approx(counted, rel=BOUND)


@pytest.mark.parametrize("path", ["static", "masked"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_static_variants_cost_what_the_counter_counts(arch, variant, path, monkeypatch):
    analytic, counted = static_case(arch, VARIANTS[variant], path, monkeypatch)
    assert analytic == pytest.approx(counted, rel=BOUND)


def test_the_fast_forms_run_less_similarity_work_than_the_masked_reducers(monkeypatch):
    """The two static paths differ, and the model tells them apart: at 1,374 tokens a merge+squeeze
    plan's fast forms save a few percent of the MACs (what the old model over-counted)."""
    static, static_counted = static_case("dinov2_reg4_518", dict(op="merge+squeeze", keep=KEEPS), "static",
                                         monkeypatch)
    masked, masked_counted = static_case("dinov2_reg4_518", dict(op="merge+squeeze", keep=KEEPS), "masked",
                                         monkeypatch)
    assert static_counted < 0.97 * masked_counted
    assert static == pytest.approx(static_counted, rel=BOUND) and masked == pytest.approx(masked_counted, rel=BOUND)


# -- paths that must compute: narrow models at the full-size token counts -------------------------------

NARROW = dict(depth=4, embed_dim=48, num_heads=3, num_classes=10)
NARROW_KEEPS = [0.8, 1.0, 0.7, 0.6]


@functools.lru_cache(maxsize=None)
def _calibrated(arch: str, op: str) -> torch.nn.Module:
    name, kwargs, px = ARCHS[arch]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **NARROW}).eval()
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=op, keep=NARROW_KEEPS), mode="static")
    ltmp_core.calibrate(model, images(4, seed=1, size=px))
    return model


@pytest.mark.parametrize("path", ["static", "dynamic", "soft"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_image_macs_cost_what_the_counter_counts_image_by_image(arch, op, path):
    """What :func:`ltmp_core.image_macs` (and through it the search's measured ratio) says each image
    cost, against the counter on that image alone; soft mode's budget term against the counter on the
    hard pass it stands for."""
    model = _calibrated(arch, op)
    px = ARCHS[arch][2]
    unreduced = ltmp_core.unreduced_macs(ltmp_core.ViTGeometry.from_model(model))
    x = images(2, seed=7, size=px)
    for i in range(2):
        image = x[i:i + 1]
        ltmp_core.set_mode(model, "static" if path == "static" else "dynamic")
        counted = counted_macs(model, image)
        if path == "soft":
            ltmp_core.set_mode(model, "soft")
            model(image)
            analytic = float(ltmp_core.expected_flops_ratio(model).detach()) * unreduced
        else:
            analytic, _ = ltmp_core.measure_flops(model, [image])
            assert ltmp_core.reduction_form(model) == ("compact" if path == "static" else "masked")
        assert analytic == pytest.approx(counted, rel=BOUND), (i, path)
    if path == "static":  # the same figure for a batch, and from the plan alone
        ltmp_core.set_mode(model, "static")
        with torch.no_grad():
            model(x)
        assert ltmp_core.image_macs(model).tolist() == pytest.approx([counted] * 2, rel=BOUND)
        assert ltmp_core.count_flops(model) == pytest.approx(counted, rel=BOUND)


def test_trace_tokens_runs_the_masked_reducers_and_is_counted_so():
    """trace_tokens follows patches through the masked reducers even in static mode: what that pass
    ran is what image_macs counts (the same tokens, more similarity work)."""
    model = _calibrated("deit_small", "merge+squeeze")
    x = images(1, seed=7, size=224)
    ltmp_core.set_mode(model, "static")

    class Traced(torch.nn.Module):
        def forward(self, x):
            ltmp_core.trace_tokens(model, x)
            return x

    counted = counted_macs(Traced(), x)
    assert ltmp_core.reduction_form(model) == "top-k"
    traced = float(ltmp_core.image_macs(model)[0])
    assert traced == pytest.approx(counted, rel=BOUND)
    compact = counted_macs(model, x)
    assert ltmp_core.reduction_form(model) == "compact"
    assert float(ltmp_core.image_macs(model)[0]) == pytest.approx(compact, rel=BOUND) and compact < traced
