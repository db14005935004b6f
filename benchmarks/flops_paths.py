"""The FLOP model against PyTorch's counter on every path, before and after it counted static mode's
fast forms (issue 25, item 8), and what that moves in a 35% static plan.

    python benchmarks/flops_paths.py [--json]

Per architecture and op, a plan with static budgets for 35% of the FLOPs (``budgets_for_ratio``,
``static=True``, the new model) is counted four ways: PyTorch's counter (halved, SDPA by the
formula of tests/flop_reference.py) on the fast forms (``static``) and on the masked reducers
(``masked``: the fast forms taken out of the registry, as soft and dynamic mode run them), the
model now (``count_flops``) and the model before (every merge or squeeze an ``n x n`` matrix at
static mode's counts: ``macs_from_counts`` with ``static=False``, which is that formula).
Full-size models on the meta device. The ``dynamic`` rows run narrow models (4 blocks, width 48)
at the same token counts, random weights, thresholds calibrated on 4 random images, each of 2
other images alone; their formula did not change.

Last, merge+prune and merge+squeeze at 35% on each architecture: the static budgets the old and the
new model solve for (equal weights), what each plan costs by each count, and the tokens they keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ltmp_core and tests
import ltmp_core  # noqa: E402
from ltmp_core import flops  # noqa: E402
from tests.flop_reference import counted_macs, versions  # noqa: E402

ARCHS = {
    "deit_small": ("deit_small_patch16_224", {}, 224),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {}, 224),
    "vit_small_384": ("vit_small_patch16_384", {}, 384),
    "dinov2_reg4_518": ("vit_small_patch14_reg4_dinov2", {"img_size": 518, "init_values": 0.1}, 518),
}
OPS = ["merge", "prune", "squeeze", "merge+prune", "merge+squeeze"]
TARGET = 0.35


def meta_model(arch: str) -> tuple[torch.nn.Module, torch.Tensor]:
    name, kwargs, px = ARCHS[arch]
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs), torch.empty(1, 3, px, px, device="meta")


def old_static_macs(plan: ltmp_core.ReductionPlan) -> float:
    """The model before: static mode's counts, every similarity over the whole sequence."""
    g = plan.geometry
    counts = [g.num_tokens] + [g.num_prefix_tokens + n for n in plan.static_counts()]
    return float(ltmp_core.macs_from_counts(g, counts, plan.layers))


def static_rows(arch: str, op: str) -> dict:
    model, x = meta_model(arch)
    g = ltmp_core.ViTGeometry.from_model(model)
    keeps = ltmp_core.budgets_for_ratio([op] * g.depth, [1.0] * g.depth, g, TARGET, static=True)
    plan = ltmp_core.make_plan(model, op=op, keep=keeps)
    ltmp_core.apply_plan(model, plan, mode="static")
    unreduced = ltmp_core.unreduced_macs(g)
    row = {"arch": arch, "op": op, "tokens": g.num_tokens, "static_counter": counted_macs(model, x) / unreduced,
           "static_new": ltmp_core.count_flops(model) / unreduced, "static_old": old_static_macs(plan) / unreduced}
    saved = dict(ltmp_core.REDUCERS)
    try:
        for name, stage in saved.items():
            ltmp_core.REDUCERS[name] = dataclasses.replace(stage, static=None)
        ltmp_core.apply_plan(model, plan, mode="static")
        row["masked_counter"] = counted_macs(model, x) / unreduced
        row["masked_new"] = ltmp_core.count_flops(model) / unreduced
    finally:
        ltmp_core.REDUCERS.update(saved)
    return row


def dynamic_row(arch: str, op: str) -> dict:
    name, kwargs, px = ARCHS[arch]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs, depth=4, embed_dim=48, num_heads=3,
                              num_classes=10).eval()
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=op, keep=[0.8, 1.0, 0.7, 0.6]), mode="static")
    g = torch.Generator().manual_seed(1)
    ltmp_core.calibrate(model, torch.randn(4, 3, px, px, generator=g))
    ltmp_core.set_mode(model, "dynamic")
    worst = 0.0
    for _ in range(2):
        image = torch.randn(1, 3, px, px, generator=g)
        analytic, _ = ltmp_core.measure_flops(model, [image])
        worst = max(worst, abs(analytic / counted_macs(model, image) - 1))
    return {"arch": arch, "op": op, "dynamic_worst_rel_error": worst}


def study_budget(arch: str, op: str) -> dict:
    """The static budgets for the target that the old and the new model solve for, and their costs."""
    model, x = meta_model(arch)
    g = ltmp_core.ViTGeometry.from_model(model)
    ops = [op] * g.depth
    new_keeps = ltmp_core.budgets_for_ratio(ops, [1.0] * g.depth, g, TARGET, static=True)
    real_form = flops._static_form
    flops._static_form = lambda layers: "masked"  # the model before: the masked reducers' work
    try:
        old_keeps = ltmp_core.budgets_for_ratio(ops, [1.0] * g.depth, g, TARGET, static=True)
    finally:
        flops._static_form = real_form
    unreduced = ltmp_core.unreduced_macs(g)
    out = {"arch": arch, "op": op, "target": TARGET}
    for label, keeps in (("old_budgets", old_keeps), ("new_budgets", new_keeps)):
        plan = ltmp_core.make_plan(model, op=op, keep=keeps)
        ltmp_core.apply_plan(model, plan, mode="static")
        out[label] = {"keeps": [round(k, 4) for k in keeps], "patch_tokens": plan.static_counts(),
                      "old_model": old_static_macs(plan) / unreduced,
                      "new_model": ltmp_core.plan_flops_ratio(plan, static=True),
                      "counter": counted_macs(model, x) / unreduced,
                      "gmacs": ltmp_core.count_flops(model) / 1e9}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    rows = [{**static_rows(a, op), **dynamic_row(a, op)} for a in ARCHS for op in OPS]
    budgets = [study_budget(a, op) for a in ARCHS for op in ("merge+prune", "merge+squeeze")]
    if args.json:
        for row in rows + [{"study_budget": b} for b in budgets] + [{"versions": versions()}]:
            print(json.dumps(row))
        return
    print(versions())
    print(f"FLOPs ratios of static plans with budgets for {TARGET} (new model); dynamic: worst error per image")
    print(f"{'arch':<22}{'op':<15}{'tokens':>7}{'counter':>9}{'new':>9}{'old':>9}{'old err':>9}"
          f"{'masked ctr':>11}{'masked new':>11}{'dyn err':>9}")
    for r in rows:
        print(f"{r['arch']:<22}{r['op']:<15}{r['tokens']:>7}{r['static_counter']:>9.4f}{r['static_new']:>9.4f}"
              f"{r['static_old']:>9.4f}{r['static_old'] / r['static_counter'] - 1:>+9.2%}{r['masked_counter']:>11.4f}"
              f"{r['masked_new']:>11.4f}{r['dynamic_worst_rel_error']:>9.1e}")
    print(f"\nStatic budgets for {TARGET} (equal weights) solved by the old and the new model:")
    for b in budgets:
        for label in ("old_budgets", "new_budgets"):
            r = b[label]
            print(f"  {b['arch']:<21} {b['op']:<14} {label}: old model {r['old_model']:.4f}, new model "
                  f"{r['new_model']:.4f}, counter {r['counter']:.4f} ({r['gmacs']:.3f} GMACs); "
                  f"patch tokens {r['patch_tokens']}")


if __name__ == "__main__":
    main()
