"""The published methods as fixed plans in the same machinery, to compare against side by side."""

from __future__ import annotations

from typing import Sequence

import optuna

from ltmp_core import LayerPlan, ReductionPlan, ViTGeometry

from ._registry import Infeasible, register_space, solve


def _plan(geometry: ViTGeometry, ops: Sequence[str], keeps: Sequence[float], space: str,
          importance: str = "mean") -> ReductionPlan:
    layers = tuple(LayerPlan(op=o, keep=k, importance=importance) for o, k in zip(ops, keeps))
    return ReductionPlan(layers, geometry=geometry, meta={"space": space})


@register_space(
    "ltmp",
    budget="global",
    description="LTMP: merge+prune in every layer, one global FLOPs budget loss",
)
def ltmp(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
        importance: Sequence[str] = ("mean",)) -> ReductionPlan:
    """Merge then prune in every block. Thresholds start at equal per-layer budgets and are then
    trained against LTMP's single FLOPs-ratio loss, free to move the cut between layers."""
    chosen = ["merge+prune"] * geometry.depth
    keeps = solve(chosen, [1.0] * geometry.depth, geometry, target)
    return _plan(geometry, chosen, keeps, "ltmp")


@register_space(
    "tome",
    budget="layer",
    tune=False,
    description="ToMe: merge a constant number of tokens r in every layer, no training",
)
def tome(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
        importance: Sequence[str] = ("mean",)) -> ReductionPlan:
    """The smallest integer ``r`` whose static plan is at or under the target. As in ToMe, a layer
    merges ``min(r, n // 2)`` tokens when ``n`` enter it, so deep layers may merge fewer."""
    from ltmp_core import plan_flops_ratio

    depth = geometry.depth

    def plan_for(r: int) -> ReductionPlan:
        n, keeps = geometry.num_patches, []
        for _ in range(depth):
            out = n - min(r, n // 2)
            keeps.append(out / n)
            n = out
        return _plan(geometry, ["merge"] * depth, keeps, "tome")

    lo, hi = 0, geometry.num_patches
    lowest = plan_flops_ratio(plan_for(hi), static=True)
    if lowest > target:
        raise Infeasible(f"ToMe's constant merging reaches at best {lowest:.3f} of the FLOPs, above {target:.3f}",
                         ["merge"] * depth)
    while lo < hi:  # smallest r with a static ratio <= target
        mid = (lo + hi) // 2
        if plan_flops_ratio(plan_for(mid), static=True) <= target:
            hi = mid
        else:
            lo = mid + 1
    plan = plan_for(lo)
    return ReductionPlan(plan.layers, geometry=geometry, meta={**plan.meta, "r": lo})


def tps_layers(depth: int) -> list[int]:
    """Three evenly spaced layers (0-based): 3, 6 and 9 of 12, as TPS prunes DeiT."""
    return sorted({max(0, min(depth - 1, round(depth * k / 4))) for k in (1, 2, 3)})


@register_space(
    "tps",
    budget="layer",
    description="TPS: squeeze at three evenly spaced layers with one keep ratio",
)
def tps(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
        importance: Sequence[str] = ("mean",)) -> ReductionPlan:
    """Squeeze at three evenly spaced blocks, scored by the class token's attention as TPS does
    (mean attention received on models without a prefix token)."""
    where = set(tps_layers(geometry.depth))
    chosen = ["squeeze" if i in where else "none" for i in range(geometry.depth)]
    keeps = solve(chosen, [1.0] * geometry.depth, geometry, target)
    return _plan(geometry, chosen, keeps, "tps", "cls" if geometry.num_prefix_tokens else "mean")
