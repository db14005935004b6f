"""Export the plan of a trial (by default the best feasible one) as a plan JSON file."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from .results import accuracy_of, best_trial, target_of
from .storage import load_study

__all__ = ["trial_plan", "export_plan"]


def trial_plan(study: optuna.Study, trial_number: int | None = None,
               flops: float | None = None) -> tuple[ReductionPlan, optuna.trial.FrozenTrial]:
    """The plan of trial ``trial_number``, or of the best feasible trial (at or under ``flops`` too,
    if given), with its learned thresholds."""
    if trial_number is None:
        trial = best_trial(study, flops)
        if trial is None:
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            target = target_of(study) if flops is None else flops
            raise LTMPError(
                f"study: {study.study_name!r} has no feasible trial ({done} complete, none at or under "
                f"the FLOPs target {target}); run more trials or export one with --trial N"
            )
    else:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not trials:
            raise LTMPError(f"trial: study {study.study_name!r} has no trial {trial_number}")
        trial = trials[0]
        if trial.state != TrialState.COMPLETE or "plan" not in trial.user_attrs:
            raise LTMPError(f"trial: trial {trial_number} is {trial.state.name.lower()}; only complete trials have a plan")
    plan = ReductionPlan.from_dict(trial.user_attrs["plan"])
    meta = {
        # Plans of older versions carried the aim after the margin as "target"; the target is the user's.
        **{k: v for k, v in plan.meta.items() if k != "target"},
        "study": study.study_name,
        "trial": trial.number,
        "top1": accuracy_of(trial),
        "flops_ratio": trial.user_attrs.get("flops_ratio"),
        "gmacs": trial.user_attrs.get("gmacs"),
        "target_flops_ratio": trial.user_attrs.get("target", target_of(study)) if flops is None else flops,
        "eval_mode": trial.user_attrs.get("eval_mode", "dynamic"),
    }
    return ReductionPlan(plan.layers, model=plan.model, geometry=plan.geometry, meta=meta), trial


def export_plan(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    output: str | os.PathLike[str],
    trial_number: int | None = None,
    flops: float | None = None,
) -> tuple[Path, ReductionPlan, optuna.trial.FrozenTrial]:
    """Write the plan to ``output`` atomically; returns the path, the plan and its trial.

    ``flops``: the best plan at or under this FLOPs ratio (a study over a range of targets has one
    for every budget in its range).
    """
    study = load_study(storage, study_name)
    plan, trial = trial_plan(study, trial_number, flops)
    return ltmp_core.save_plan(plan, output), plan, trial
