"""Export the plan of a trial (by default the best feasible one) as a plan JSON file."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from ..setup.budget import Budget
from .record import StudyRecord, TrialRecord
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
        if trial.state != TrialState.COMPLETE or TrialRecord.from_trial(trial).plan is None:
            raise LTMPError(f"trial: trial {trial_number} is {trial.state.name.lower()}; only complete trials have a plan")
    record = TrialRecord.from_trial(trial)
    plan = ReductionPlan.from_dict(record.plan)
    # The trial's budget (plans of earlier versions recorded neither the target nor the margin in their
    # meta: the trial's target and the study's margin); a best plan "at or under --flops" of a study over
    # a range of targets has that target.
    config = StudyRecord.from_study(study).config or {}
    target = flops if flops is not None else record.target if record.target is not None else target_of(study)
    budget = Budget.from_meta(plan.meta, target=target, margin=None if "flops_margin" in plan.meta
                              else config.get("flops_margin"))
    meta = {
        # Plans of older versions carried the aim after the margin as "target"; the target is the user's.
        **{k: v for k, v in plan.meta.items() if k != "target"},
        **(budget.to_meta() if budget is not None else {}),
        "study": study.study_name,
        "trial": trial.number,
        "top1": accuracy_of(trial),
        "flops_ratio": record.flops_ratio,
        "gmacs": record.gmacs,
        "eval_mode": record.eval_mode or "dynamic",
    }
    study_record = StudyRecord.from_study(study)
    if study_record.latency_target is not None:
        meta.update({
            "target_latency_ratio": study_record.latency_target,
            "latency_batch": config.get("latency_batch"),
            "latency_mode": config.get("latency_mode"),
            "predicted_latency_ratio": record.predicted_latency_ratio,
            "measured_latency_ratio": study_record.measured_latency().get(trial.number),
        })
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
