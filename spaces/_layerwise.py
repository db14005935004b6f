from __future__ import annotations

from typing import Any, Sequence

import optuna

from ltmp_core import LayerPlan, ReductionPlan, ViTGeometry

from ._baselines import tps_layers
from ._registry import register_space, solve


def _params(ops: Sequence[str], importance: Sequence[str]) -> dict[str, Any]:
    """The parameters of :func:`layerwise` that sample ``ops`` with equal cut weights."""
    params: dict[str, Any] = {f"op_{i}": op for i, op in enumerate(ops)}
    params.update({f"cut_{i}": 0.5 for i in range(len(ops))})
    if len(importance) > 1:
        params.update({f"imp_{i}": importance[0] for i in range(len(ops))})
    return params


def published_shapes(geometry: ViTGeometry, ops: Sequence[str], importance: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The plans the papers use, as layerwise parameters, as far as ``ops`` allows.

    Uniform merge+prune (LTMP's block everywhere), uniform merge (ToMe-like) and squeeze at three
    evenly spaced layers (TPS), each with equal cuts. A study that starts from them is never worse
    than these under the same tuning budget.
    """
    depth = geometry.depth
    tps = set(tps_layers(depth))
    shapes = {"LTMP shape": ["merge+prune"] * depth, "ToMe shape": ["merge"] * depth,
              "TPS shape": ["squeeze" if i in tps else "none" for i in range(depth)]}
    return {label: _params(shape, importance) for label, shape in shapes.items() if all(op in ops for op in shape)}


@register_space(
    "layerwise",
    budget="layer",
    description="per layer an operation and a share of the cut, scaled onto the FLOPs target",
    seeds=published_shapes,
)
def layerwise(
    trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
    importance: Sequence[str] = ("mean",),
) -> ReductionPlan:
    """Per layer ``op_i`` (one of ``ops``), a reduction weight ``cut_i`` in [0, 1] and, when more
    than one kind of importance is allowed, ``imp_i`` (how prune and squeeze score its tokens).

    The weights set how hard each layer cuts relative to the others; one common factor, found by
    bisection on the analytic FLOP model (:func:`ltmp_core.budgets_for_ratio`), turns them into
    budgets whose predicted FLOPs ratio is the target. Every parameter is sampled in every trial
    (a fixed search space, which multivariate TPE, NSGA-II and GP samplers prefer); the weight of a
    ``none`` layer is ignored.
    """
    chosen = [trial.suggest_categorical(f"op_{i}", list(ops)) for i in range(geometry.depth)]
    weights = [trial.suggest_float(f"cut_{i}", 0.0, 1.0) for i in range(geometry.depth)]
    kinds = ([trial.suggest_categorical(f"imp_{i}", list(importance)) for i in range(geometry.depth)]
             if len(importance) > 1 else [importance[0]] * geometry.depth)
    keeps = solve(chosen, weights, geometry, target)
    layers = tuple(LayerPlan(op=o, keep=k, importance=imp) for o, k, imp in zip(chosen, keeps, kinds))
    return ReductionPlan(layers, geometry=geometry, meta={"space": "layerwise"})
