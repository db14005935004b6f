from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import optuna

from ltmp_core import OPS, LTMPError, ReductionPlan, ViTGeometry, budgets_for_ratio
from ltmp_core.plan import IMPORTANCE

SpaceFn = Callable[..., ReductionPlan]


class Infeasible(Exception):
    """The sampled plan cannot reach the FLOPs target; the message says why.

    The objective turns it into a pruned trial before any training.
    """


def solve(ops: Sequence[str], weights: Sequence[float], geometry: ViTGeometry, target: float) -> list[float]:
    """Per-layer budgets on the target (:func:`ltmp_core.budgets_for_ratio`), or :class:`Infeasible`."""
    try:
        return budgets_for_ratio(ops, weights, geometry, target)
    except LTMPError as e:
        raise Infeasible(str(e).removeprefix("target: ")) from None


@dataclass(frozen=True)
class Space:
    """A registered search space.

    Attributes:
        name: Registry key (``--space``).
        fn: ``fn(trial, geometry, target, *, ops, importance) -> ReductionPlan``.
        budget: Budget loss used while tuning thresholds: ``"layer"`` (each layer against its own
            budget) or ``"global"`` (LTMP's FLOPs ratio against the target).
        tune: Whether thresholds are fine-tuned; ``False`` evaluates the plan in static mode.
        description: One line for ``--help`` and the docs.
    """

    name: str
    fn: SpaceFn
    budget: str = "layer"
    tune: bool = True
    description: str = ""


SPACES: dict[str, Space] = {}


def register_space(name: str, *, budget: str = "layer", tune: bool = True, description: str = ""):
    """Register ``fn(trial, geometry, target, *, ops, importance) -> ReductionPlan`` as space ``name``."""
    if budget not in ("layer", "global"):
        raise ValueError(f"budget must be 'layer' or 'global', got {budget!r}")

    def wrap(fn: SpaceFn) -> SpaceFn:
        SPACES[name] = Space(name, fn, budget, tune, description)
        return fn

    return wrap


def get_space(name: str) -> Space:
    try:
        return SPACES[name]
    except KeyError:
        raise LTMPError(f"space: unknown search space {name!r} (choose from {', '.join(SPACES)})") from None


def check_ops(ops: Sequence[str] | None) -> tuple[str, ...]:
    ops = tuple(OPS) if ops is None else tuple(ops)
    if not ops:
        raise LTMPError("ops: give at least one operation")
    for op in ops:
        if op not in OPS:
            raise LTMPError(f"ops: unknown operation {op!r} (choose from {', '.join(OPS)})")
    return ops


def check_importance(importance: Sequence[str] | None) -> tuple[str, ...]:
    importance = ("mean",) if importance is None else tuple(importance)
    if not importance or any(i not in IMPORTANCE for i in importance):
        raise LTMPError(f"importance: expected some of {', '.join(IMPORTANCE)}, got {', '.join(importance) or 'none'}")
    return importance


def suggest(
    name: str,
    trial: optuna.trial.BaseTrial,
    geometry: ViTGeometry,
    target: float,
    *,
    ops: Sequence[str] | None = None,
    importance: Sequence[str] | None = None,
) -> ReductionPlan:
    """Sample a plan from space ``name``; raises :class:`Infeasible` when it cannot reach ``target``.

    ``importance``: the scores prune and squeeze may use (``mean``, ``cls``); with both, the
    ``layerwise`` space samples one per layer.
    """
    return get_space(name).fn(trial, geometry, target, ops=check_ops(ops), importance=check_importance(importance))
