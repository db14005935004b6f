"""The study's sampler reads only sampled trials: refined trials (``--refine-top``) repeat a parent's
parameters with a value tuning earned, and a sampler must not learn from them."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from search.study.record import TrialRecord
from search.study.samplers import SampledTrialsOnly, make_sampler

DISTRIBUTIONS = {"x": FloatDistribution(0.0, 1.0), "k": IntDistribution(0, 9)}
N_TRIALS = 9  # the samplers' start-up: 3 random trials (TPE, GP), populations of 4 (NSGA-II)


def _value(params: dict) -> float:
    """Sampled trials score best near x = 0.2."""
    return 1.0 - abs(params["x"] - 0.2)


def _ask(study: optuna.Study, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        trial = study.ask(DISTRIBUTIONS)
        out.append(dict(trial.params))
        study.tell(trial, _value(trial.params))
    return out


def _add_refined(study: optuna.Study) -> None:
    """Refined trials as the refine stage adds them (``create_trial``, ``refined_from``), at shapes near
    x = 0.9 with values no sampled trial reached: a sampler fitting them would go there."""
    for j in range(8):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=2.0 + j, params={"x": 0.85 + 0.01 * j, "k": 9},
            distributions=DISTRIBUTIONS, user_attrs=TrialRecord(refined_from=0).to_user_attrs()))


def _proposals(sampler: optuna.samplers.BaseSampler, refined: bool) -> list[dict]:
    """Eight sampled trials, the refined trials if asked, then what the sampler proposes next."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    _ask(study, 8)
    if refined:
        _add_refined(study)
    return _ask(study, 6)


@pytest.mark.parametrize("name", ["tpe", "gp", "nsga2", "random"])
def test_the_sampler_proposes_as_if_the_refined_trials_were_not_there(name):
    assert _proposals(make_sampler(name, 3, N_TRIALS), refined=True) == \
        _proposals(make_sampler(name, 3, N_TRIALS), refined=False)


def test_without_the_filter_the_refined_trials_move_tpe():
    """The control: a bare TPE sampler, fed the same histories, goes where the refined trials are."""
    bare = lambda: optuna.samplers.TPESampler(seed=3, n_startup_trials=3, multivariate=True)
    with_refined, plain = _proposals(bare(), refined=True), _proposals(bare(), refined=False)
    assert with_refined != plain
    assert sum(p["x"] > 0.7 for p in with_refined) > sum(p["x"] > 0.7 for p in plain)


def test_the_study_itself_still_holds_and_ranks_the_refined_trials():
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", 0, N_TRIALS))
    _ask(study, 8)
    _add_refined(study)
    _ask(study, 1)
    assert len(study.trials) == 8 + 8 + 1
    assert TrialRecord.from_trial(study.best_trial).refined_from == 0
    assert isinstance(study.sampler, SampledTrialsOnly)
