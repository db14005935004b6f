"""The refine stage (``search run --refine-top K``): refined trials, their compute and FLOPs, resuming,
the flags, and the export."""

from __future__ import annotations

import json
from dataclasses import replace

import optuna
import pytest
import torch

import ltmp_core
from search.setup.config import StudyConfig
from search.study.objective import Objective
from search.study.record import TrialRecord
from search.study.refine import refine_study
from search.study.results import state_counts
from tests.search.helpers import TINY_DIGITS, cli_in, isolate, preset, run_study

#: The structured space (one solved shift per trial, no tuning: what refining adds to), at a target most of
#: its shapes reach on the tiny digits model.
TINY = {**TINY_DIGITS, "space": "structured", "trial_steps": 0, "n_trials": 5, "flops": 0.7}
STEPS = 3


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A finished 5-trial study, and its objective with hooks counting what runs through the base model
    (every trial's model is a deep copy of it, hooks included)."""
    workdir = tmp_path_factory.mktemp("refine")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, workdir)
        config = StudyConfig(**TINY)
        objective = Objective.open(config)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(objective, n_trials=config.n_trials)
        seen = {"forward": 0, "backward": 0}
        objective.base.register_forward_pre_hook(lambda m, args: seen.__setitem__("forward", seen["forward"] + args[0].shape[0]))
        objective.base.register_full_backward_pre_hook(
            lambda m, grad: seen.__setitem__("backward", seen["backward"] + grad[0].shape[0]))
        yield config, objective, study, seen


def _feasible_shapes(study: optuna.Study) -> set[str]:
    return {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE and TrialRecord.from_trial(t).feasible
            and TrialRecord.from_trial(t).refined_from is None}


def test_refined_trials_record_their_parent_and_the_compute_that_ran(tuned):
    config, objective, study, seen = tuned
    assert _feasible_shapes(study), "the fixture's study needs a feasible shape"
    seen.update(forward=0, backward=0)
    added = refine_study(study, objective, top=1, steps=STEPS)
    assert len(added) == 1
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == added[0])
    record = TrialRecord.from_trial(trial)
    parent = next(t for t in study.get_trials(deepcopy=False) if t.number == record.refined_from)
    assert TrialRecord.from_trial(parent).feasible and TrialRecord.from_trial(parent).refined_from is None
    assert parent.value == max(t.value for t in study.get_trials(deepcopy=False)
                               if t.value is not None and TrialRecord.from_trial(t).feasible and t is not trial
                               and TrialRecord.from_trial(t).refined_from is None)
    assert trial.params == parent.params and trial.distributions == parent.distributions
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == record.accuracy
    assert trial.constraints == {"flops": pytest.approx(record.flops_ratio - config.flops)}
    # every image forward counted, a backward pass as two forwards; the tuning ran its steps
    assert seen["backward"] == STEPS * config.batch_size
    assert record.images_processed == seen["forward"] > STEPS * config.batch_size
    assert record.forward_equivalents == seen["forward"] + 2 * seen["backward"]
    assert record.recipe["steps"] == STEPS and record.recipe["budget"] == "global"


def test_after_the_re_solve_the_flops_sit_on_the_aim(tuned):
    config, objective, study, _ = tuned
    refine_study(study, objective, top=1, steps=STEPS)
    trial = next(t for t in study.get_trials(deepcopy=False) if TrialRecord.from_trial(t).refined_from is not None)
    record = TrialRecord.from_trial(trial)
    # measured again, independently: the recorded plan on a fresh copy of the base model, on the select split
    model = objective.bench.reduced(ltmp_core.ReductionPlan.from_dict(record.plan), "dynamic")[0]
    ltmp_core.set_mode(model, "dynamic")
    images = [(x, y) for x, y in objective.data.holdout_batches(config.batch_size)]
    with torch.no_grad():
        macs, _ = ltmp_core.measure_flops(model, images)
    ratio = macs / ltmp_core.unreduced_macs(objective.geometry)
    aim = config.flops_budget().aim
    assert ratio == pytest.approx(record.flops_ratio, abs=1e-3)
    assert aim - 0.05 <= ratio <= config.flops, "the tuned thresholds were shifted back onto the aim"
    assert record.feasible


def test_k_larger_than_the_distinct_feasible_shapes_refines_each_once(tuned):
    config, objective, study, _ = tuned
    refine_study(study, objective, top=50, steps=1)
    refine_study(study, objective, top=50, steps=1)  # again: nothing left to refine
    parents = [TrialRecord.from_trial(t).refined_from for t in study.get_trials(deepcopy=False)
               if TrialRecord.from_trial(t).refined_from is not None]
    assert len(parents) == len(set(parents)) == len(_feasible_shapes(study))
    assert sum(state_counts(study).values()) == config.n_trials, "refined trials are not sampled trials"


def test_a_resumed_study_refines_no_parent_twice_and_counts_only_sampled_trials(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    (tmp_path / "tiny.toml").write_text(preset(space="structured", trial_steps=0, n_trials=3))
    args = ("--refine-top", "2", "--refine-steps", "1")
    url = f"sqlite:///{tmp_path / 'r'}.db"
    base = ("run", "--flops", "0.7", "--preset", "tiny.toml", "--storage", url, "--study-name", "r", "--quiet")
    code, out, err = cli_in(tmp_path, *base, *args)
    assert code == 0, err
    study = optuna.load_study(study_name="r", storage=url)
    first = {t.number: TrialRecord.from_trial(t).refined_from for t in study.get_trials(deepcopy=False)
             if TrialRecord.from_trial(t).refined_from is not None}
    assert first and "Refined trial" in out
    code, out, err = cli_in(tmp_path, *base, *args)
    assert code == 0, err
    assert "already has 3 finished trials" in out, "refined trials are not counted as the study's trials"
    study = optuna.load_study(study_name="r", storage=url)
    again = {t.number: TrialRecord.from_trial(t).refined_from for t in study.get_trials(deepcopy=False)
             if TrialRecord.from_trial(t).refined_from is not None}
    assert again == first
    code, out, err = cli_in(tmp_path, *base, *args, "--n-trials", "4")
    assert code == 0, err
    study = optuna.load_study(study_name="r", storage=url)
    records = [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False)]
    assert sum(r.refined_from is None for r in records) == 4, "one more sampled trial, whatever was refined"
    parents = [r.refined_from for r in records if r.refined_from is not None]
    assert len(parents) == len(set(parents))


@pytest.mark.parametrize("flag, value", [("--refine-top", "-1"), ("--refine-steps", "0"), ("--refine-top", "x")])
def test_bad_refine_flags_exit_2_with_one_line_naming_the_flag(tmp_path, flag, value):
    code, out, err = cli_in(tmp_path, "run", flag, value, "--storage", f"sqlite:///{tmp_path / 'x'}.db")
    assert code == 2
    assert flag in err and len(err.strip().splitlines()) <= 2  # argparse adds its usage line for a non-number
    assert not (tmp_path / "x.db").exists()


def test_export_picks_a_refined_trial_when_it_is_best(tuned, tmp_path):
    config, objective, study, _ = tuned
    refine_study(study, objective, top=1, steps=STEPS)
    refined = next(t for t in study.get_trials(deepcopy=False) if TrialRecord.from_trial(t).refined_from is not None)
    url = f"sqlite:///{tmp_path / 'e'}.db"
    # the same trials in a stored study, every sampled one made worse than the refined one
    copy = optuna.create_study(study_name="e", storage=url, direction="maximize")
    copy.set_user_attr("config", replace(config, refine_top=1).to_dict())
    for t in study.get_trials(deepcopy=False):
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        value = t.value if t.number == refined.number else refined.value - 0.5
        copy.add_trial(optuna.trial.create_trial(value=value, params=t.params, distributions=t.distributions,
                                                 user_attrs={**t.user_attrs, "accuracy": value},
                                                 constraints=dict(t.constraints)))
    code, out, err = cli_in(tmp_path, "export", "e", "--storage", url, "-o", str(tmp_path / "plan.json"))
    assert code == 0, err
    exported = ltmp_core.load_plan(tmp_path / "plan.json")
    wanted = ltmp_core.ReductionPlan.from_dict(TrialRecord.from_trial(refined).plan)
    parent = next(t for t in study.get_trials(deepcopy=False) if t.number == TrialRecord.from_trial(refined).refined_from)
    unrefined = ltmp_core.ReductionPlan.from_dict(TrialRecord.from_trial(parent).plan)
    assert [l.merge_threshold for l in exported.layers] == [l.merge_threshold for l in wanted.layers]
    assert [l.merge_threshold for l in exported.layers] != [l.merge_threshold for l in unrefined.layers], \
        "tuning and the re-solve moved the parent's thresholds"
