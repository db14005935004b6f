"""Optuna samplers and pruners by name: the tables that ``--sampler`` and ``--pruner`` choose from."""

from __future__ import annotations

from typing import Any, Callable, Container, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from .results import is_added

__all__ = ["SAMPLERS", "PRUNERS", "make_sampler", "make_pruner", "SampledTrialsOnly"]


def _startup(n_trials: int) -> int:
    """Random trials before a model-based sampler takes over: a third of the study, 3 to 10."""
    return max(3, min(10, n_trials // 3))


#: ``--sampler`` name -> ``factory(seed, n_trials)``.
#: The model-based ones read the study's trials through :class:`SampledTrialsOnly`, so refined trials
#: (``--refine-top``) and re-aimed ones (``--latency-reaim``) never enter their model; NSGA-II builds its
#: populations only from trials it tagged with a generation when it proposed them, which an added trial is not.
SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, n: SampledTrialsOnly(
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=_startup(n), multivariate=True)),
    "nsga2": lambda seed, n: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n // 2))),
    "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
    "gp": lambda seed, n: SampledTrialsOnly(optuna.samplers.GPSampler(seed=seed, n_startup_trials=_startup(n))),
}

#: ``--pruner`` name -> ``factory(steps)``; a trial reports its held-out accuracy at step 0 (calibrated,
#: untuned) and every ``eval_every`` tuning steps.
PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda steps: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    "hyperband": lambda steps: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, steps)),
    "none": lambda steps: optuna.pruners.NopPruner(),
}


class _SampledView:
    """A study as its sampler should read it: the trials a sampler proposed, added (refined, re-aimed) ones left out.
    Everything else (storage, directions, writes) is the study's own."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if not is_added(t)]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if not is_added(t)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class SampledTrialsOnly(optuna.samplers.BaseSampler):
    """A sampler that models only the trials a sampler proposed.

    A refined trial (``search run --refine-top``, :mod:`search.study.refine`) repeats its parent's
    parameters with a value that tuning earned, not the shape: a model-based sampler that read it would
    count one shape twice and credit the shape with the tuning. A study resumed after a refine stage
    would then sample around its refined winners. This wrapper hands the inner sampler a view of the
    study without refined trials (as Optuna's ``HyperbandPruner`` hands its brackets a filtered study);
    the refined trials stay in the study for the best trial, the export and ``search show``.

    Only for samplers that read trials by state and value, not by position in the list (Optuna's genetic
    samplers index the list by trial number).
    """

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(_SampledView(study), trial)  # type: ignore[arg-type]

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.inner.sample_relative(_SampledView(study), trial, search_space)  # type: ignore[arg-type]

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(_SampledView(study), trial, param_name, param_distribution)  # type: ignore[arg-type]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(_SampledView(study), trial)  # type: ignore[arg-type]

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(_SampledView(study), trial, state, values)  # type: ignore[arg-type]

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    return SAMPLERS[name](seed, n_trials)


def make_pruner(name: str, steps: int) -> optuna.pruners.BasePruner:
    return PRUNERS[name](steps)
