"""The published methods as spaces in the same machinery, faithful to their released code.

- ``ltmp``: LTMP's released recipe (tools/train.py of the LTMP repository): merge then prune in every
  block, ToMe's token order, raw mean-attention importance, thresholds starting at 0.9 (merge) and
  0 (prune), trained with plain SGD (5e-3 and 5e-6), tau 0.5, label smoothing 0.1, clamped to
  [0, 1], loss ``CE + 10 * (r_target - r_flops)^2``, through LTMP's own training forward (soft form
  ``ltmp``, :mod:`ltmp_core.released`). One fixed plan.
- ``ltmp-search``: the same, with the recipe's hyperparameters (the two learning rates, tau, the
  budget weight) sampled per trial: the fair baseline for a search of equal compute.
- ``tome``: ToMe: a constant number ``r`` of merges in every block (at most half of the tokens),
  its token order and parity, no training; ``r`` the smallest that reaches the target.
- ``tps``: TPS's squeeze (host by feature similarity, weights e and exp(similarity)) after pruning
  by the class token's attention (EViT-style, as TPS's eTPS) with one keep ratio at three evenly
  spaced blocks; fixed counts, no training.

Where these reference methods differ from this project's own choices (the order-preserving split,
key similarity and size-weighted squeezing, importance relative to the live count, Adam in units of
the score spread, a calibrated start), the project's choices are the defaults of ``LayerPlan`` and
``Recipe``; docs/benchmarks.md reports what each one changes.
"""

from __future__ import annotations

from typing import Sequence

import optuna

from ltmp_core import LayerPlan, ReductionPlan, ViTGeometry

from ._registry import Infeasible, register_space, solve

#: LTMP's released training recipe, as ``Recipe`` fields (search/finetune.py); steps are the caller's.
LTMP_TUNING = dict(optimizer="sgd", lr=5e-3, lr_prune=5e-6, budget="global", budget_weight=10.0, smoothing=0.1,
                   clamp=True, start="plan", tau=0.5, soft_form="ltmp")


def _plan(geometry: ViTGeometry, ops: Sequence[str], keeps: Sequence[float], space: str, **layer) -> ReductionPlan:
    layers = tuple(LayerPlan(op=o, keep=k, **layer) for o, k in zip(ops, keeps))
    return ReductionPlan(layers, geometry=geometry, meta={"space": space})


def _ltmp_plan(geometry: ViTGeometry, target: float, space: str, tuning: dict) -> ReductionPlan:
    depth = geometry.depth
    chosen = ["merge+prune"] * depth
    keeps = solve(chosen, [1.0] * depth, geometry, target)  # informative: LTMP's thresholds decide
    plan = _plan(geometry, chosen, keeps, space, merge_order="tome", importance="mean", importance_scale="raw")
    plan = plan.with_layers(merge_threshold=[0.9] * depth, prune_threshold=[0.0] * depth)
    return ReductionPlan(plan.layers, geometry=geometry, meta={"space": space, "tuning": tuning})


@register_space("ltmp", budget="global", description="LTMP's released recipe: merge+prune everywhere, "
                "thresholds from 0.9 and 0, SGD, one FLOPs term")
def ltmp(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
         importance: Sequence[str] = ("mean",)) -> ReductionPlan:
    """LTMP as released: one plan, its recipe (:data:`LTMP_TUNING`)."""
    return _ltmp_plan(geometry, target, "ltmp", dict(LTMP_TUNING))


def _ltmp_seed(geometry: ViTGeometry, ops: Sequence[str], importance: Sequence[str]) -> dict[str, dict]:
    """The released values start the search."""
    return {"LTMP released": {"lr": 5e-3, "lr_prune": 5e-6, "tau": 0.5, "budget_weight": 10.0}}


@register_space("ltmp-search", budget="global", description="LTMP with its recipe's learning rates, tau and "
                "budget weight searched (the fair baseline)", seeds=_ltmp_seed)
def ltmp_search(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
                importance: Sequence[str] = ("mean",)) -> ReductionPlan:
    """LTMP's plan and recipe, with the hyperparameters of its training script sampled (log-uniform
    around the released values: merge lr 5e-3, prune lr 5e-6, tau 0.5, budget weight 10)."""
    tuning = dict(LTMP_TUNING)
    tuning.update(
        lr=trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        lr_prune=trial.suggest_float("lr_prune", 1e-7, 1e-3, log=True),
        tau=trial.suggest_float("tau", 0.05, 1.0, log=True),
        budget_weight=trial.suggest_float("budget_weight", 1.0, 1000.0, log=True),
    )
    return _ltmp_plan(geometry, target, "ltmp-search", tuning)


@register_space(
    "tome",
    budget="layer",
    tune=False,
    description="ToMe: merge a constant number of tokens r in every layer, its token order, no training",
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
        return _plan(geometry, ["merge"] * depth, keeps, "tome", merge_order="tome")

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
    """Three evenly spaced layers (0-based): 3, 6 and 9 of 12, where TPS prunes DeiT."""
    return sorted({max(0, min(depth - 1, round(depth * k / 4))) for k in (1, 2, 3)})


@register_space(
    "tps",
    budget="layer",
    tune=False,
    description="TPS: prune by class attention and squeeze at three evenly spaced layers, one keep ratio",
)
def tps(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
        importance: Sequence[str] = ("mean",)) -> ReductionPlan:
    """Squeeze at three evenly spaced blocks with one keep ratio (TPS: 0.7 at blocks 3, 6, 9 of DeiT;
    here the ratio that meets the target), tokens kept by the class token's attention (mean attention
    received on models without a class token), TPS's squeeze, fixed counts."""
    from ltmp_core import plan_flops_ratio

    where = set(tps_layers(geometry.depth))
    chosen = ["squeeze" if i in where else "none" for i in range(geometry.depth)]
    aim = target
    for _ in range(100):  # the keep ratio is solved on the continuous model; fixed counts round up
        keeps = solve(chosen, [1.0] * geometry.depth, geometry, aim)
        plan = _plan(geometry, chosen, keeps, "tps", importance="cls" if geometry.num_prefix_tokens else "mean",
                     squeeze_host="tps")
        if plan_flops_ratio(plan, static=True) <= target:
            return plan
        aim *= 0.995
    raise Infeasible(f"TPS's fixed counts do not reach {target:.3f}", chosen)
