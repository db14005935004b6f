"""Tokens and width in one space: the structured shape, plus how many heads and MLP units each block keeps.

The token half is the ``structured`` space's nine parameters. The width half is a profile over depth:
per block, the fraction of MLP hidden units kept is ``mlp_keep + mlp_tilt * (t - 1/2)`` and the fraction
of attention heads ``heads_keep + heads_tilt * (t - 1/2)``, with ``t`` the block's depth in [0, 1],
rounded to whole heads and to steps of 1/32 of the hidden width. Every block thus gets its own cut,
from four numbers: independent per-block width parameters (24 more for a 12-block model) are more
than a study of a few dozen trials can learn, and on the proxy the landscape of token shapes near the
top was already flatter than the select split can resolve (docs/benchmarks.md).

One FLOPs target for both halves: the width cut costs what the analytic model says
(:func:`ltmp_core.plan_flops_ratio` counts the narrower blocks), and the trial solves the shared merge
threshold on the width-cut model for what is left, as in ``structured``. A trial cuts the width of its
copy of the base model first (``search.setup.width.cut_width``: torch-pruning, Taylor importance on the
calibration batch), then calibrates its thresholds as any other.
"""

from __future__ import annotations

from typing import Any, Sequence

import optuna

from ltmp_core import ReductionPlan, ViTGeometry

from ._registry import register_space
from ._structured import _seeds as _shape_seeds
from ._structured import shape_params, shape_plan

#: The width profile at full width: what the published methods' shapes are seeded with.
FULL_WIDTH = {"mlp_keep": 1.0, "mlp_tilt": 0.0, "heads_keep": 1.0, "heads_tilt": 0.0}


def block_widths_of(geometry: ViTGeometry, p: dict[str, float]) -> list[tuple[int, int]]:
    """``(heads, mlp_hidden)`` per block of a width profile (see the module's docstring)."""
    depth, step = geometry.depth, max(1, geometry.mlp_hidden // 32)
    out = []
    for i in range(depth):
        t = i / max(1, depth - 1) - 0.5
        mlp = min(1.0, max(0.0, p["mlp_keep"] + p["mlp_tilt"] * t))
        heads = min(1.0, max(0.0, p["heads_keep"] + p["heads_tilt"] * t))
        units = min(geometry.mlp_hidden, max(step, step * round(mlp * geometry.mlp_hidden / step)))
        out.append((min(geometry.num_heads, max(1, round(heads * geometry.num_heads))), units))
    return out


def _seeds(geometry: ViTGeometry, ops: Sequence[str], importance: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The published methods' token shapes at full width (as ``structured`` seeds them)."""
    return {label: {**params, **FULL_WIDTH} for label, params in _shape_seeds(geometry, ops, importance).items()}


@register_space(
    "joint",
    budget="global",
    description="the structured token shape plus a per-block cut of attention heads and MLP units "
                "(torch-pruning); one FLOPs target for both",
    seeds=_seeds,
    cuts_width=True,
    stages=True,
)
def joint(trial: optuna.trial.BaseTrial, geometry: ViTGeometry, target: float, *, ops: Sequence[str],
          importance: Sequence[str] = ("mean",), max_stride: int = 1) -> ReductionPlan:
    """The nine shape parameters of ``structured`` (ten with ``max_stride``) and four of the width profile."""
    shape = shape_params(trial, geometry.depth, ops, importance, max_stride)
    profile = {
        "mlp_keep": trial.suggest_float("mlp_keep", 0.25, 1.0),
        "mlp_tilt": trial.suggest_float("mlp_tilt", -1.0, 1.0),
        "heads_keep": trial.suggest_float("heads_keep", 0.25, 1.0),
        "heads_tilt": trial.suggest_float("heads_tilt", -1.0, 1.0),
    }
    return shape_plan(shape, geometry, target, ops, "joint", block_widths_of(geometry, profile))
