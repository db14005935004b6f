"""A low-dimensional space of plan shapes whose thresholds are solved for the FLOPs target.

Nine parameters describe a whole plan: which blocks merge (``merge``, ``merge_from``, ``merge_to``),
which prune or squeeze (``prune``, ``prune_from``) and how (``importance``, ``host``), the token order
of the merges (``order``), how the merge threshold changes with depth (``slope``) and how hard the
pruning cuts beside the merging (``prune_level``). The space writes only offsets into the plan; the
trial then solves one shift of all merge thresholds (of all prune thresholds in a plan without
merges) on the calibration batch so that the measured FLOPs ratio is the target
(``ltmp_core.calibrate_to_flops``). So every sampled shape is a plan on the target,
and a shape that cannot reach it is pruned before it costs more than its calibration.

Why solve one shift instead of a budget per layer: on the proxy, merging in every block the tokens
more similar than one shared threshold kept 95.9% (select split) at 34% of the FLOPs where the same
op with equal per-layer budgets kept 91.8% (docs/benchmarks.md): a shared threshold lets every block
and every image merge as much as it is redundant.
"""

from __future__ import annotations

from typing import Any, Sequence

import optuna

from ltmp_core import LayerPlan, ReductionPlan, ViTGeometry

from ._baselines import tps_layers
from ._registry import Infeasible, register_space, solve

PRUNES = ("none", "prune", "squeeze")


def _seeds(geometry: ViTGeometry, ops: Sequence[str], importance: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The published methods' shapes: LTMP's (merge then prune in every block, mean attention),
    ToMe's (merge in every block), TPS's (squeeze at three evenly spaced blocks, class attention)."""
    depth = geometry.depth
    common = {"merge_from": 0, "merge_to": depth, "slope": 0.0, "prune_level": 1e-3, "prune_from": 0, "host": "keys",
              "order": "tome"}
    ltmp = {**common, "merge": True, "prune": "prune", "importance": "mean"}
    tome = {**common, "merge": True, "prune": "none", "importance": importance[0]}
    tps = {**common, "merge": False, "prune": "squeeze", "prune_from": tps_layers(depth)[0], "host": "tps",
           "importance": "cls", "order": "keep"}
    out = {}
    for label, seed in (("LTMP shape", ltmp), ("ToMe shape", tome), ("TPS shape", tps)):
        if seed["importance"] not in importance:
            seed["importance"] = importance[0]
        if all(op in ops for op in _ops(seed, depth)):
            out[label] = {k: v for k, v in seed.items() if k != "importance" or len(importance) > 1}
    return out


def _ops(p: dict[str, Any], depth: int) -> list[str]:
    """The op of every block of a shape. With ``stage_stride`` k, only the first of every k reducing blocks
    runs its op (counted over the blocks that would reduce, from the first); the others run unreduced."""
    out = []
    for layer in range(depth):
        merges = p["merge"] and p["merge_from"] <= layer < p["merge_to"]
        prunes = p["prune"] != "none" and layer >= p["prune_from"]
        if merges and prunes:
            out.append(f"merge+{p['prune']}")
        else:
            out.append("merge" if merges else p["prune"] if prunes else "none")
    stride = p.get("stage_stride", 1)
    reducing = [layer for layer, op in enumerate(out) if op != "none"]
    for rank, layer in enumerate(reducing):
        if rank % stride:
            out[layer] = "none"
    return out


def shape_params(trial: optuna.trial.BaseTrial, depth: int, ops: Sequence[str],
                 importance: Sequence[str], max_stride: int = 1) -> dict[str, Any]:
    """The nine shape parameters (every one sampled in every trial: a fixed space, as multivariate TPE
    wants); with ``max_stride`` above 1 a tenth, ``stage_stride``: every reducing block runs (1), or only
    every k-th (fewer stages, each cutting harder: the thresholds are solved for the target either way)."""
    can_merge = any("merge" in op for op in ops)
    prunes = [p for p in PRUNES if p == "none" or any(op.endswith(p) for op in ops)]
    stride = {"stage_stride": trial.suggest_int("stage_stride", 1, max_stride)} if max_stride > 1 else {}
    return {
        **stride,
        "merge": trial.suggest_categorical("merge", [True, False] if can_merge else [False]),
        "merge_from": trial.suggest_int("merge_from", 0, depth // 2),
        "merge_to": trial.suggest_int("merge_to", depth // 2 + 1, depth),
        "slope": trial.suggest_float("slope", -0.05, 0.05),
        "order": trial.suggest_categorical("order", ["keep", "tome"]),
        "prune": trial.suggest_categorical("prune", prunes),
        "prune_from": trial.suggest_int("prune_from", 0, depth - 1),
        "prune_level": trial.suggest_float("prune_level", 1e-3, 1.0, log=True),
        "host": trial.suggest_categorical("host", ["keys", "tps"]),
        "importance": trial.suggest_categorical("importance", list(importance)) if len(importance) > 1
        else importance[0],
    }


def shape_plan(p: dict[str, Any], geometry: ViTGeometry, target: float, ops: Sequence[str], space: str,
               widths: Sequence[tuple[int | None, int | None]] | None = None) -> ReductionPlan:
    """The plan of a shape (and of the blocks' widths, ``(heads, mlp_hidden)``), its thresholds as offsets
    for the trial to solve (``tuning.start = solve``)."""
    depth = geometry.depth
    chosen = _ops(p, depth)
    if all(op == "none" for op in chosen):
        raise Infeasible("the sampled shape reduces no block", chosen)
    missing = sorted(set(chosen) - set(ops) - {"none"})
    if missing:
        raise Infeasible(f"the sampled shape needs {', '.join(missing)}, which --ops does not allow", chosen)
    widths = list(widths) if widths is not None else [(None, None)] * depth
    merging = any("merge" in op for op in chosen)
    layers = []
    for i, (op, (heads, hidden)) in enumerate(zip(chosen, widths)):
        merge_threshold = p["slope"] * (i / max(1, depth - 1) - 0.5) if "merge" in op else None
        prunes_here = op.endswith(("prune", "squeeze"))
        prune_threshold = (p["prune_level"] if merging else 0.0) if prunes_here else None
        layers.append(LayerPlan(op=op, merge_threshold=merge_threshold, prune_threshold=prune_threshold,
                                importance=p["importance"], merge_order=p["order"], squeeze_host=p["host"],
                                heads=heads, mlp_hidden=hidden))
    # Equal budgets: what static mode keeps; their floor check says at once whether the shape can
    # reach the target at all. The trial's solved thresholds decide what dynamic mode keeps.
    keeps = solve(chosen, [1.0] * depth, geometry, target, layers)
    plan = ReductionPlan(tuple(layers), geometry=geometry, meta={"space": space, "tuning": {"start": "solve"}})
    return plan.with_layers(keep=keeps)


@register_space(
    "structured",
    budget="global",
    description="nine parameters of a plan's shape; the thresholds solved for the target (default)",
    seeds=_seeds,
    stages=True,
)
def structured(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
               importance: Sequence[str] = ("mean",), max_stride: int = 1) -> ReductionPlan:
    """A plan shape from nine parameters (ten with ``max_stride``); thresholds are offsets, solved by the trial."""
    return shape_plan(shape_params(trial, geometry.depth, ops, importance, max_stride), geometry, target, ops,
                      "structured")
