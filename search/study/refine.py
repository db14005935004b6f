"""The refine stage (``search run --refine-top K``): after a study's trials, its best few shapes tuned.

A trial scores a shape with one shared threshold shift solved for the FLOPs aim (and, with
``--trial-steps``, a few tuning steps). The refine stage spends more on the few shapes that won on
select: the best ``K`` distinct feasible shapes (sampled trials only, ranked on select as every command
ranks them, :func:`search.study.results.ranked_trials`; two trials with the same parameters are one
shape) each run again from the same start, get ``--refine-steps`` steps of LTMP-style gradient tuning
of their thresholds (:func:`search.study.tuning.tune_thresholds` with the global FLOPs term), then the
shared shift is re-solved so the FLOPs sit on the aim, and the result is scored on select
(:meth:`search.study.objective.Objective.refine`).

Each refined shape becomes a trial of its own (``optuna.trial.create_trial``, ``Study.add_trial``):
its parent's parameters and distributions, its own value, FLOPs constraint and record, with
``refined_from`` = the parent's number and its compute counted as a trial's is
(:mod:`search.study.compute`). Refined trials are not slots: they do not count towards
``--n-trials`` (:func:`search.study.results.state_counts`), and the best trial, the export and
``search show`` read them like any other. A parent is refined once: a resumed study refines only
shapes that no refined trial came from yet, and its sampler never models a refined trial
(:class:`search.study.samplers.SampledTrialsOnly`): more trials after a refine stage are sampled as
if it had not run.
"""

from __future__ import annotations

import json
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ltmp_core import Unreachable

from .objective import Objective, Refined
from .record import TrialRecord
from .results import is_added, ranked_trials
from .tuning import NonFiniteLoss

__all__ = ["shape_key", "refine_parents", "refine_study", "add_children"]


def shape_key(trial: FrozenTrial) -> str:
    """What makes two trials the same shape: the same sampled parameters."""
    return json.dumps(trial.params, sort_keys=True, default=str)


def refine_parents(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The best ``top`` distinct feasible shapes of the study's sampled trials (fewer if it has fewer),
    best first, less those a refined trial already came from."""
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    done = {shape_key(by_number[r]) for r in (TrialRecord.from_trial(t).refined_from for t in trials)
            if r is not None and r in by_number}
    chosen: list[FrozenTrial] = []
    seen: set[str] = set()
    for t in ranked_trials(study):
        if len(seen) == top:
            break
        if is_added(t) or not TrialRecord.from_trial(t).feasible:
            continue
        key = shape_key(t)
        if key in seen:
            continue
        seen.add(key)
        if key not in done:
            chosen.append(t)
    return chosen


def add_children(study: optuna.Study, parents: list[FrozenTrial], make: Callable[[FrozenTrial], Refined], link: str,
                 errors: tuple[type[BaseException], ...],
                 on_done: Callable[[FrozenTrial, FrozenTrial | None, str | None], None] | None = None) -> list[int]:
    """Run ``make`` (:meth:`Objective.refine` or :meth:`Objective.reaim`) on every parent and add what it gave as a
    complete trial with the parent's parameters and distributions (found again by its ``link`` record field,
    ``refined_from`` or ``reaimed_from``, naming the parent); a parent whose run raises one of ``errors`` is
    skipped. ``on_done(parent, added, reason)``: after each, with the added trial, or ``None`` and why not.
    Returns the numbers of the trials added."""
    added: list[int] = []
    for parent in parents:
        try:
            got = make(parent)
        except errors as e:
            if on_done is not None:
                on_done(parent, None, str(e) or type(e).__name__)
            continue
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=got.value, params=dict(parent.params),
            distributions=dict(parent.distributions), user_attrs=got.user_attrs, constraints=got.constraints))
        child = next(t for t in reversed(study.get_trials(deepcopy=False))
                     if getattr(TrialRecord.from_trial(t), link) == parent.number)
        added.append(child.number)
        if on_done is not None:
            on_done(parent, child, None)
    return added


def refine_study(study: optuna.Study, objective: Objective, top: int, steps: int,
                 on_refined: Callable[[FrozenTrial | None, FrozenTrial, str | None], None] | None = None) -> list[int]:
    """Refine the study's best ``top`` shapes (see the module); returns the numbers of the trials added.

    ``on_refined(trial, parent, reason)``: after each parent, with the added trial, or ``None`` and why
    it could not be refined (a re-solve that cannot reach the aim after tuning, a non-finite loss).
    """
    if top <= 0:
        return []
    told = None if on_refined is None else (lambda parent, added, reason: on_refined(added, parent, reason))
    return add_children(study, refine_parents(study, top), lambda parent: objective.refine(parent, steps),
                        "refined_from", (Unreachable, NonFiniteLoss, optuna.TrialPruned), told)
