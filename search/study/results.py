"""Reading a study back: its trials ranked, its best feasible trial, summaries for the commands."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .record import StudyRecord, TrialRecord

__all__ = ["FINISHED", "state_counts", "is_refined", "is_added", "sampled_finished", "refined_trials", "ranked_trials", "best_trial", "feasible_check", "trial_summary", "list_studies", "target_of", "accuracy_of"]

#: States of a trial that counts towards ``--n-trials``.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Real checks of a latency study from which the latency model's bias on the device is read (see
#: :class:`_Feasibility`).
BIAS_CHECKS = 3


def target_of(study: optuna.Study | optuna.study.StudySummary) -> float | None:
    """The FLOPs ratio the user asked the study for (its saved configuration's ``flops``)."""
    return StudyRecord.from_study(study).target


def is_refined(trial: FrozenTrial) -> bool:
    """A trial of the refine stage (:mod:`search.study.refine`), not one the sampler proposed."""
    return TrialRecord.from_trial(trial).refined_from is not None


def is_added(trial: FrozenTrial) -> bool:
    """A trial added after the sampled ones: refined (:func:`is_refined`) or re-aimed after the latency
    checks (:func:`search.study.latency_study.reaim_checked`). Not a slot, never modelled by the sampler."""
    r = TrialRecord.from_trial(trial)
    return r.refined_from is not None or r.reaimed_from is not None


def state_counts(study: optuna.Study) -> dict[TrialState, int]:
    """How many of the study's sampled trials are in each state (every state present, 0 when none).
    Added trials (refined or re-aimed, :func:`is_added`) are left out: they are not slots and do not count
    towards ``--n-trials``."""
    out = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        if not is_added(t):
            out[t.state] += 1
    return out


def sampled_finished(study: optuna.Study) -> int:
    """Finished (complete or pruned) trials that count towards ``--n-trials``: added ones left out."""
    c = state_counts(study)
    return sum(c[state] for state in FINISHED)


def refined_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials the refine stage added, in order."""
    return [t for t in study.get_trials(deepcopy=False) if is_refined(t)]


def accuracy_of(trial: FrozenTrial) -> float | None:
    """A trial's top-1 (its first objective; a study over a range of targets has two)."""
    return trial.values[0] if trial.values else None


class _Feasibility:
    """Whether a trial is feasible: at or under its own FLOPs target and, if given, under ``flops`` too;
    with a latency target, a trial timed after the run (``latency_checks``) counts by its measured
    latency ratio, the others by their prediction (recorded in ``feasible``). Once at least
    :data:`BIAS_CHECKS` trials were timed and ran slower than predicted (the median of measured over
    predicted, :attr:`bias`, above 1), an untimed trial's prediction counts scaled by that bias: the
    checks showed the model optimistic on this device, and a plan they did not time is no better known (a
    re-aimed trial's prediction is already scaled by what its shape measured: it is not scaled again, and its
    check does not count towards the bias)."""

    def __init__(self, study: optuna.Study, flops: float | None) -> None:
        record = StudyRecord.from_study(study)
        self.flops = flops
        self.latency = record.latency_target
        self.measured = record.measured_latency() if self.latency is not None else {}
        timed = [c["measured"] / c["predicted"] for c in record.latency_checks or []
                 if c.get("predicted") and c.get("measured") and c.get("latency_correction") is None]
        self.bias = max(1.0, statistics.median(timed)) if self.latency is not None and len(timed) >= BIAS_CHECKS \
            else 1.0

    def __call__(self, trial: FrozenTrial) -> bool:
        r = TrialRecord.from_trial(trial)
        if self.flops is not None and (r.flops_ratio is None or r.flops_ratio > self.flops):
            return False
        if trial.number in self.measured:
            return (r.flops_ratio is not None and r.target is not None and r.flops_ratio <= r.target
                    and self.measured[trial.number] <= self.latency)
        if self.bias > 1.0 and r.predicted_latency_ratio is not None and r.latency_correction is None:
            return bool(r.feasible) and r.predicted_latency_ratio * self.bias <= self.latency
        return bool(r.feasible)


def feasible_check(study: optuna.Study, flops: float | None = None) -> Callable[[FrozenTrial], bool]:
    """A function that says whether a trial of ``study`` is feasible (see :func:`ranked_trials`)."""
    return _Feasibility(study, flops)


def ranked_trials(study: optuna.Study, flops: float | None = None) -> list[FrozenTrial]:
    """Complete trials, best first: feasible ones (at or under the target, and under ``flops`` if
    given; with a latency target, by the measured latency ratio where the trial was timed, else by
    the predicted one) by accuracy, ties by fewer FLOPs; then the others by accuracy. The one ranking
    every command uses."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    feasible = _Feasibility(study, flops)

    def ratio(t: FrozenTrial) -> float:
        value = TrialRecord.from_trial(t).flops_ratio
        return 1.0 if value is None else value

    return sorted(complete, key=lambda t: (not feasible(t), -accuracy_of(t), ratio(t), t.number))


def best_trial(study: optuna.Study, flops: float | None = None) -> FrozenTrial | None:
    """The most accurate feasible trial (measured FLOPs at or under the target, and at or under
    ``flops`` if given: a study over a range of targets answers for any budget in it; with a latency
    target, at or under it as measured or, where not timed, as predicted), or ``None``."""
    ranked = ranked_trials(study, flops)
    return ranked[0] if ranked and _Feasibility(study, flops)(ranked[0]) else None


def trial_summary(trial: FrozenTrial, measured: dict[int, float] | None = None) -> dict[str, Any]:
    """What ``search show`` prints of one trial (``measured``: trial number -> measured latency ratio,
    :meth:`StudyRecord.measured_latency`)."""
    r = TrialRecord.from_trial(trial)
    layers = (r.plan or {}).get("layers", [])
    ops = [layer["op"] for layer in layers] or list(r.ops or [])
    duration = trial.duration.total_seconds() if trial.duration else None
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "top1": accuracy_of(trial),
        "flops_ratio": r.flops_ratio,
        "gmacs": r.gmacs,
        "feasible": r.feasible,
        "predicted_latency_ratio": r.predicted_latency_ratio,
        "measured_latency_ratio": (measured or {}).get(trial.number),
        "ops": ops,
        "keeps": [layer["keep"] for layer in layers],
        "duration_s": duration,
        "reason": r.reason,
        "seed_of": r.seed_of,
        "refined_from": r.refined_from,
        "reaimed_from": r.reaimed_from,
    }


def list_studies(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """One summary per study: name, target, trials by state, best feasible accuracy."""
    out = []
    for s in storage.get_all_studies():
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        best = best_trial(study)
        record = StudyRecord.from_study(s)
        config = record.config or {}
        out.append({
            "study": s.study_name,
            "target_flops_ratio": config.get("flops"),
            "model": config.get("model"),
            "space": config.get("space"),
            "trials": len(trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "refined": sum(is_refined(t) for t in trials),
            "best_trial": None if best is None else best.number,
            "best_top1": None if best is None else accuracy_of(best),
            "best_flops_ratio": None if best is None else TrialRecord.from_trial(best).flops_ratio,
            "target_latency_ratio": config.get("latency"),
            "latency_batch": config.get("latency_batch") if config.get("latency") is not None else None,
            "latency_mode": config.get("latency_mode", "static") if config.get("latency") is not None else None,
            "best_predicted_latency_ratio": None if best is None else TrialRecord.from_trial(best).predicted_latency_ratio,
            "best_measured_latency_ratio": None if best is None else record.measured_latency().get(best.number),
            "started": min((t.datetime_start for t in trials if t.datetime_start), default=None),
        })
    return out
