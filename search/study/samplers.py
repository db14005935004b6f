"""Optuna samplers and pruners by name: the tables that ``--sampler`` and ``--pruner`` choose from."""

from __future__ import annotations

from typing import Callable

import optuna

__all__ = ["SAMPLERS", "PRUNERS", "make_sampler", "make_pruner"]


def _startup(n_trials: int) -> int:
    """Random trials before a model-based sampler takes over: a third of the study, 3 to 10."""
    return max(3, min(10, n_trials // 3))


#: ``--sampler`` name -> ``factory(seed, n_trials)``.
SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, n: optuna.samplers.TPESampler(seed=seed, n_startup_trials=_startup(n), multivariate=True),
    "nsga2": lambda seed, n: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n // 2))),
    "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
    "gp": lambda seed, n: optuna.samplers.GPSampler(seed=seed, n_startup_trials=_startup(n)),
}

#: ``--pruner`` name -> ``factory(steps)``; a trial reports its held-out accuracy at step 0 (calibrated,
#: untuned) and every ``eval_every`` tuning steps.
PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda steps: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    "hyperband": lambda steps: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, steps)),
    "none": lambda steps: optuna.pruners.NopPruner(),
}


def make_sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    return SAMPLERS[name](seed, n_trials)


def make_pruner(name: str, steps: int) -> optuna.pruners.BasePruner:
    return PRUNERS[name](steps)
