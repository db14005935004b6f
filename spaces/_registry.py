from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna

from ltmp_core import IMPORTANCE, OPS, LayerPlan, LTMPError, ReductionPlan, ViTGeometry

SpaceFn = Callable[..., ReductionPlan]
SeedFn = Callable[[ViTGeometry, Sequence[str], Sequence[str]], list[dict[str, Any]]]


class Infeasible(Exception):
    """The sampled plan cannot reach the FLOPs target; the message says why.

    The objective turns it into a pruned trial before any training. ``ops`` are the operations the
    trial had sampled, per layer, for the record.
    """

    def __init__(self, message: str, ops: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.ops = list(ops)


def solve(ops: Sequence[str], weights: Sequence[float], geometry: ViTGeometry, target: float,
          like: Sequence[LayerPlan] | None = None) -> list[float]:
    """Per-layer budgets on the target (:func:`ltmp_core.budgets_for_ratio`; ``like``: the plan's layers,
    whose widths and variants count), or :class:`Infeasible`."""
    from ltmp_core import budgets_for_ratio  # the FLOP model needs torch; naming a space does not

    try:
        return budgets_for_ratio(ops, weights, geometry, target, like=like)
    except LTMPError as e:
        raise Infeasible(str(e).removeprefix("target: "), ops) from None


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
        seeds: ``seeds(geometry, ops, importance)``: the plans a new study of this space starts from
            (the published methods' shapes), as ``{label: parameters}`` in order, or ``None``. The
            label names the method on the trial (its record's ``seed_of``), in tables and the dashboard.
        cuts_width: Whether its plans may cut heads and MLP units as well as tokens (a latency model
            measured on full-width blocks cannot predict those, so ``--latency`` refuses such a space).
        stages: Whether it can sample how many of a shape's reducing blocks run (``max_stride``: every
            block, or only every k-th, k up to ``max_stride``; fewer stages, each cutting harder, where a
            stage's own work outweighs what it saves). Its ``fn`` then takes ``max_stride``.
    """

    name: str
    fn: SpaceFn
    budget: str = "layer"
    tune: bool = True
    description: str = ""
    seeds: SeedFn | None = None
    cuts_width: bool = False
    stages: bool = False

    def seeded(self, geometry: ViTGeometry, ops: Sequence[str], importance: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """``(label, parameters)`` of a new study's first trials (none for a space without seeds)."""
        return [] if self.seeds is None else list(self.seeds(geometry, tuple(ops), tuple(importance)).items())

    def seed_params(self, geometry: ViTGeometry, ops: Sequence[str], importance: Sequence[str]) -> list[dict[str, Any]]:
        """Parameters of a new study's first trials (none for a space without seeds)."""
        return [params for _, params in self.seeded(geometry, ops, importance)]


SPACES: dict[str, Space] = {}


def register_space(name: str, *, budget: str = "layer", tune: bool = True, description: str = "",
                   seeds: SeedFn | None = None, cuts_width: bool = False, stages: bool = False):
    """Register ``fn(trial, geometry, target, *, ops, importance) -> ReductionPlan`` as space ``name``.

    Registering a name again replaces the space, with a warning (as timm's model registry does).
    """
    if budget not in ("layer", "global"):
        raise ValueError(f"budget must be 'layer' or 'global', got {budget!r}")

    def wrap(fn: SpaceFn) -> SpaceFn:
        if name in SPACES:
            warnings.warn(f"Overwriting search space {name!r} ({SPACES[name].fn.__qualname__}) with "
                          f"{fn.__qualname__}", stacklevel=2)
        SPACES[name] = Space(name, fn, budget, tune, description, seeds, cuts_width, stages)
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
    max_stride: int = 1,
) -> ReductionPlan:
    """Sample a plan from space ``name``; raises :class:`Infeasible` when it cannot reach ``target``.

    ``importance``: the scores prune and squeeze may use (``mean``, ``cls``); with both, the
    ``layerwise`` space samples one per layer. ``max_stride`` above 1: the space also samples whether
    every reducing block of the shape runs or only every k-th (k up to ``max_stride``; a space that
    cannot, ``Space.stages`` false, is an error).
    """
    space = get_space(name)
    options: dict[str, Any] = {}
    if max_stride > 1:
        if not space.stages:
            raise LTMPError(f"stage_stride: the {name!r} space cannot sample fewer reduction stages "
                            f"(spaces that can: {', '.join(s.name for s in SPACES.values() if s.stages)})")
        options["max_stride"] = max_stride
    return space.fn(trial, geometry, target, ops=check_ops(ops), importance=check_importance(importance), **options)
