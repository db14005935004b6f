from __future__ import annotations

from typing import Sequence

import optuna

from ltmp_core import LayerPlan, LTMPError, ReductionPlan, ViTGeometry, budgets_for_ratio

from ._registry import Infeasible, register_space


@register_space(
    "layerwise",
    budget="layer",
    description="per layer an operation and a share of the cut, scaled onto the FLOPs target",
)
def layerwise(
    trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str]
) -> ReductionPlan:
    """Per layer ``op_i`` (one of ``ops``) and a reduction weight ``cut_i`` in [0, 1].

    The weights set how hard each layer cuts relative to the others; one common factor, found by
    bisection on the analytic FLOP model (:func:`ltmp_core.budgets_for_ratio`), turns them into
    budgets whose predicted FLOPs ratio is the target. Every parameter is sampled in every trial
    (a fixed search space, which multivariate TPE, NSGA-II and GP samplers prefer); the weight of a
    ``none`` layer is ignored.
    """
    chosen = [trial.suggest_categorical(f"op_{i}", list(ops)) for i in range(geometry.depth)]
    weights = [trial.suggest_float(f"cut_{i}", 0.0, 1.0) for i in range(geometry.depth)]
    try:
        keeps = budgets_for_ratio(chosen, weights, geometry, target)
    except LTMPError as e:
        raise Infeasible(str(e).removeprefix("target: ")) from None
    layers = tuple(LayerPlan(op=o, keep=k) for o, k in zip(chosen, keeps))
    return ReductionPlan(layers, geometry=geometry, meta={"space": "layerwise", "target": target})
