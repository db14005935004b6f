"""Search spaces: an Optuna trial, a model geometry and a FLOPs target in, a ReductionPlan out.

A space is a pure function ``(trial, geometry, target, *, ops) -> ReductionPlan``: it asks the trial
for parameters and uses ``ltmp_core``'s FLOP model to put the plan on the target; it touches no
weights and no data. Register one with :func:`register_space`; :data:`SPACES` lists them.

    >>> import optuna, spaces
    >>> plan = spaces.suggest("layerwise", optuna.trial.FixedTrial(params), geometry, 0.35)
"""

from __future__ import annotations

from ._registry import SPACES, Infeasible, Space, get_space, register_space, suggest
from . import _baselines, _joint, _layerwise, _structured  # noqa: F401  (registration)
from ._baselines import LTMP_TUNING

__all__ = ["SPACES", "Infeasible", "Space", "get_space", "register_space", "suggest", "LTMP_TUNING"]
