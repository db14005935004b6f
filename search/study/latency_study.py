"""A study with a latency budget: its latency models (one per kind of device), and the real timing of
its best trials after a run.

The latency model of a device (:class:`search.setup.latency.LatencyModel`) is measured once and kept
in the study (user attribute ``latency_models``, keyed by device fingerprint, batch and mode), so
every worker on the same kind of device predicts with the same model. A study whose models were all
measured on other devices is refused unless ``--latency-remeasure`` asks for one of this device.

After the trials, the best feasible trials are timed for real (:func:`check_latency`): plan and
unreduced model interleaved in this process, median of three repeats (a prediction that misses by more
than :data:`ERROR_BOUND` is timed again), until one meets the target and at least :data:`MIN_CHECKS` are
timed. From then on the measured ratio decides a checked trial's
feasibility (:func:`search.study.results.ranked_trials`).

A trial's FLOPs aim was solved from the model's prediction, so where the model is pessimistic about a shape
the plan cuts more than the target needs, and where it is optimistic the plan misses the target. Then the
best timed shapes whose measured ratio lies more than :data:`REAIM_SLACK` from the aim run again, every
prediction scaled by what was measured over what was predicted (:func:`reaim_checked`,
``--latency-reaim N``), and are timed in turn.
"""

from __future__ import annotations

from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan, ViTGeometry
from spaces import get_space

from ..setup.config import StudyConfig, label
from ..setup.latency import LatencyModel, kinds_for, measure_latency_model, model_key
from ..setup.timing import check_timeable, device_fingerprint, latency_ratio
from ..setup.workbench import Workbench
from .record import StudyRecord, TrialRecord
from .refine import add_children
from .results import accuracy_of, best_trial, feasible_check, is_added, ranked_trials

__all__ = ["study_latency_model", "check_latency", "timing_images", "study_stride", "stride_for", "strided_plan", "MIN_CHECKS",
           "MAX_CHECKS", "ERROR_BOUND", "REMEASURE_REPEATS", "LATENCY_STRIDE", "STRIDE_GAIN", "REAIM_SLACK", "reaim_checked", "time_best"]

#: Trials timed after a run at least (while there are feasible ones), and at most.
MIN_CHECKS, MAX_CHECKS = 3, 8
#: A prediction further than this from the measured ratio is measured again (:data:`REMEASURE_REPEATS` more
#: repeats, pooled with the first ones) and, if still beyond it, reported.
ERROR_BOUND = 0.10
REMEASURE_REPEATS = 5
#: A timed trial whose measured latency ratio lies further than this (relative) from its aim, the target less
#: its margin, is re-aimed (:func:`reaim_checked`): under it, it cut more than it needed to; over it, too little.
REAIM_SLACK = 0.05
#: The largest ``stage_stride`` a latency study opens by itself, when its latency model predicts that fewer stages
#: run at least :data:`STRIDE_GAIN` faster than a stage in every block (:func:`stride_for`).
LATENCY_STRIDE, STRIDE_GAIN = 3, 0.02
#: FLOPs ratios :func:`stride_for` compares strides at (those under the study's aim, and the aim itself): with a
#: latency target the trials' FLOPs are wherever their latency meets it.
STRIDE_AIMS = (0.35, 0.5, 0.7)
#: Select images a dynamic plan is timed on, at the least (in batches of the latency batch size).
DYNAMIC_IMAGES = 64


def study_latency_model(study: optuna.Study, bench: Workbench, config: StudyConfig, *,
                        remeasure: bool | None = None,
                        on_measure: Callable[[str], None] | None = None) -> LatencyModel:
    """The study's latency model of this device, measured and stored first if the study has none (or
    has one of fewer kinds of block than the study's ops can run, :func:`kinds_for`).

    Raises:
        LTMPError: the device cannot be timed, or the study's models are of other devices and
            ``remeasure`` (default ``config.latency_remeasure``) is not set.
    """
    check_timeable(bench.device, label("device"))
    fingerprint = device_fingerprint(bench.device)
    key = model_key(fingerprint, config.latency_batch, config.latency_mode)
    models = dict(StudyRecord.from_study(study).latency_models or {})
    kinds = kinds_for(config.ops, config.importance)
    if key in models:
        stored = LatencyModel.from_dict(models[key])
        if set(kinds) <= set(stored.attention):
            return stored
        # Measured by an earlier version for fewer kinds of block than this one tells apart: measure again.
    others = [LatencyModel.from_dict(m) for k, m in models.items() if k != key]
    same_setting = [m for m in others if m.batch == config.latency_batch and m.mode == config.latency_mode]
    allow = config.latency_remeasure if remeasure is None else remeasure
    if same_setting and not allow:
        raise LTMPError(f"{label('latency')}: the study's latency model was measured on another device "
                        f"({same_setting[0].fingerprint}), not on this one ({fingerprint}); run it there, or pass "
                        "--latency-remeasure to measure one here (its trials then mix devices)")
    if on_measure is not None:
        on_measure(f"measuring the latency model of this device ({fingerprint}, batch {config.latency_batch}, "
                   f"{config.latency_mode}); once per study and device")
    model = measure_latency_model(bench.base, kinds, batch=config.latency_batch,
                                  mode=config.latency_mode, device=bench.device)
    models[model.key] = model.to_dict()
    StudyRecord.write(study, latency_models=models)
    return model


def strided_plan(geometry: ViTGeometry, op: str, stride: int, flops: float, **layer: Any) -> ReductionPlan:
    """``op`` in every ``stride``-th block from the first, the others unreduced, equal budgets for ``flops``
    of the unreduced FLOPs (``layer``: the other :func:`ltmp_core.make_plan` fields). Raises ``LTMPError``
    where that few stages cannot reach ``flops``."""
    ops = [op if i % stride == 0 else "none" for i in range(geometry.depth)]
    keeps = ltmp_core.budgets_for_ratio(ops, [1.0] * geometry.depth, geometry, flops)
    return ltmp_core.make_plan(geometry, op=ops, keep=keeps, **layer)


def stride_for(model: LatencyModel, geometry: ViTGeometry,
               config: StudyConfig) -> tuple[int, dict[str, dict[int, float]]]:
    """Whether fewer reduction stages pay on this device, by its latency model: the study's first reducing op
    (ToMe's order where it merges) in every block, in every 2nd, ..., every :data:`LATENCY_STRIDE`-th block,
    with equal budgets for one FLOPs ratio, each predicted; at each ratio a trial of the study may sit at
    (:data:`STRIDE_AIMS` at or under the study's aim, and that aim: its FLOPs aim, or with a latency target
    alone the latency aim read as a FLOPs ratio). Returns :data:`LATENCY_STRIDE` where at any of them a stride
    is predicted at least :data:`STRIDE_GAIN` faster than stride 1, else 1; and the predictions, by ratio
    (``"0.350"``) and stride (strides whose stages cannot reach the ratio are left out)."""
    op = next((o for o in config.ops if o != "none"), None)
    if op is None:
        return 1, {}
    top = config.flops_budget().aim if config.flops < 1.0 else config.latency * (1.0 - config.latency_margin)
    predictions: dict[str, dict[int, float]] = {}
    opens = False
    for aim in sorted({top, *(a for a in STRIDE_AIMS if a < top)}):
        predicted: dict[int, float] = {}
        for k in range(1, LATENCY_STRIDE + 1):
            try:
                plan = strided_plan(geometry, op, k, aim, importance=config.importance[0], merge_order="tome")
            except LTMPError:
                continue  # this few stages cannot reach the ratio
            predicted[k] = model.ratio(plan, geometry)
        predictions[f"{aim:.3f}"] = predicted
        if 1 in predicted and min(predicted.values()) <= predicted[1] * (1.0 - STRIDE_GAIN):
            opens = True
    return (LATENCY_STRIDE if opens else 1), predictions


def study_stride(study: optuna.Study, geometry: ViTGeometry, config: StudyConfig, model: LatencyModel,
                 on_note: Callable[[str], None] | None = None) -> int:
    """The largest ``stage_stride`` the study's trials sample: ``--stage-stride`` where given; else in a static
    latency study whose space can sample it, what the study decided when it started (:func:`stride_for` on
    the latency model of the device it started on, stored as ``stage_stride``, so workers and resumed runs
    sample the same space; a study with finished trials and no decision began before there was one: 1);
    else 1."""
    if config.stage_stride is not None:
        return config.stage_stride
    if config.latency_mode != "static" or not get_space(config.space).stages:
        return 1
    record = StudyRecord.from_study(study)
    if record.stage_stride is not None:
        return record.stage_stride
    if any(t.state.is_finished() for t in study.get_trials(deepcopy=False)):
        # Begun before studies decided this: its trials sampled nine parameters, and its later ones do too.
        StudyRecord.write(study, stage_stride=1)
        return 1
    stride, predicted = stride_for(model, geometry, config)
    StudyRecord.write(study, stage_stride=stride,
                      stride_predictions={aim: {str(k): v for k, v in p.items()} for aim, p in predicted.items()})
    if on_note is not None and predicted:
        shown = "; ".join(f"FLOPs {aim}: " + ", ".join(f"every {k}: {v:.3f}" for k, v in p.items())
                          for aim, p in predicted.items())
        on_note(f"fewer reduction stages are predicted {'faster' if stride > 1 else 'no faster'} on this device "
                f"({shown}); trials sample a stage stride up to {stride}" + ("" if stride > 1 else
                " (--stage-stride K asks for more)"))
    return stride


def timing_images(bench: Workbench, batch: int, mode: str) -> list[torch.Tensor]:
    """What a plan is timed on at ``batch`` in ``mode``. Static mode: one batch of random images (its counts
    are fixed). Dynamic mode: the first batches of the select split (the thresholds' counts depend on the
    images; at least :data:`DYNAMIC_IMAGES` images, every call takes the next batch)."""
    if mode == "static":
        generator = torch.Generator().manual_seed(0)
        return [torch.randn(batch, 3, *bench.geometry.img_size, generator=generator).to(bench.device)]
    wanted = max(1, -(-DYNAMIC_IMAGES // batch))
    batches = [b[0].to(bench.device) for b in bench.data.holdout_batches(batch, limit=wanted * batch)]
    return [b for b in batches if len(b) == batch] or batches[:1]


def _error(predicted: float | None, measured: float) -> float | None:
    """The relative error of a prediction (``None`` where there is none)."""
    return None if predicted is None else predicted / measured - 1.0


def _candidate(study: optuna.Study, checked: set[int]) -> optuna.trial.FrozenTrial | None:
    """The best trial, feasible by what is known of it, that has not been timed yet."""
    feasible = feasible_check(study)
    for trial in ranked_trials(study):
        if not feasible(trial):
            return None  # ranked: the feasible ones come first
        if trial.number not in checked:
            return trial
    return None


def check_latency(study: optuna.Study, bench: Workbench, config: StudyConfig, *, repeats: int = 3,
                  trials: list[int] | None = None,
                  on_check: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Time the best feasible trials for real, until one meets the latency target and at least
    :data:`MIN_CHECKS` are timed (at most :data:`MAX_CHECKS`); with ``trials``, time those (the ones not
    timed yet on this device) instead. Every check is stored in the study's ``latency_checks`` at once.
    Returns this call's checks (``on_check`` sees each). A plan is timed on :func:`timing_images`; one whose
    prediction misses the first timing by more than :data:`ERROR_BOUND` is timed again, and the check holds
    the median over all its repeats (``first_measured`` keeps the first)."""
    record = StudyRecord.from_study(study)
    checks = list(record.latency_checks or [])
    fingerprint = device_fingerprint(bench.device)
    checked = {c["trial"] for c in checks if c.get("device") == fingerprint and c.get("batch") == config.latency_batch}
    x = timing_images(bench, config.latency_batch, config.latency_mode)
    new: list[dict[str, Any]] = []
    met = any(c["feasible"] for c in checks if c["trial"] in checked)
    asked = None if trials is None else [n for n in trials if n not in checked]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)} if asked else {}
    while len(new) < MAX_CHECKS:
        if asked is None:
            if met and len(checked) >= MIN_CHECKS:
                break
            trial = _candidate(study, checked)
        else:
            trial = by_number.get(asked.pop(0)) if asked else None
        if trial is None:
            break
        check = _time_trial(trial, bench, config, x, repeats, fingerprint)
        checks = [c for c in checks if not (c["trial"] == trial.number and c.get("device") == fingerprint)] + [check]
        StudyRecord.write(study, latency_checks=checks)
        checked.add(trial.number)
        met = met or check["feasible"]
        new.append(check)
        if on_check is not None:
            on_check(check)
    return new


def time_best(study: optuna.Study, bench: Workbench, config: StudyConfig, *, repeats: int = 3) -> list[dict[str, Any]]:
    """Time the study's best trial until the best is one that was timed (at most :data:`MAX_CHECKS` more): added
    trials and their checks move the ranking, and the plan a study names should not be one nobody timed."""
    new: list[dict[str, Any]] = []
    while len(new) < MAX_CHECKS:
        best = best_trial(study)
        got = [] if best is None else check_latency(study, bench, config, repeats=repeats, trials=[best.number])
        if not got:
            break
        new += got
    return new


def _time_trial(trial: optuna.trial.FrozenTrial, bench: Workbench, config: StudyConfig, x: list[torch.Tensor],
                repeats: int, fingerprint: str) -> dict[str, Any]:
    """One check: the trial's plan timed against the unreduced model (again, pooled, when it misses its
    prediction by more than :data:`ERROR_BOUND`)."""
    r = TrialRecord.from_trial(trial)
    plan = ReductionPlan.from_dict(r.plan)
    reduced, _ = bench.reduced(plan, config.latency_mode)
    measured = latency_ratio(bench.base, reduced, x, repeats=repeats)
    first = measured
    error = _error(r.predicted_latency_ratio, measured.ratio)
    if error is not None and abs(error) > ERROR_BOUND:
        # One timing on a shared machine can be off by more than the bound: time it again and pool.
        measured = measured.pooled(latency_ratio(bench.base, reduced, x, repeats=REMEASURE_REPEATS))
    return {
        "trial": trial.number, "predicted": r.predicted_latency_ratio, "measured": measured.ratio,
        "spread": measured.spread, "error": _error(r.predicted_latency_ratio, measured.ratio),
        "first_measured": first.ratio, "remeasured": measured is not first,
        "feasible": measured.ratio <= config.latency, "target": config.latency, "device": fingerprint,
        "batch": config.latency_batch, "mode": config.latency_mode, "base_ms": 1000 * measured.base_s,
        "plan_ms": 1000 * measured.plan_s, "repeats": measured.repeats,
        **({} if r.latency_correction is None else {"latency_correction": r.latency_correction}),
    }


def reaim_checked(study: optuna.Study, config: StudyConfig, device: torch.device,
                  reaim: Callable[[FrozenTrial, float], Any], top: int | None = None,
                  on_reaimed: Callable[[FrozenTrial, FrozenTrial | None, str | None], None] | None = None) -> list[int]:
    """Re-aim the best ``top`` (default ``config.latency_reaim``) timed shapes whose measured latency ratio lies
    more than :data:`REAIM_SLACK` from the aim (the target less its margin): over it, or under it where the
    latency solve had cut below the trial's FLOPs aim (a trial held by the FLOPs target has nothing to give
    back); timed on ``device``. Each runs again (``reaim(parent, correction)``:
    :meth:`search.study.objective.Objective.reaim`) with the model's predictions scaled
    by its measured over predicted ratio, so its shift is solved for where this device puts the target, and is
    added as a trial of its own (``reaimed_from``; not a slot, never modelled by the sampler). Sampled trials
    only, best on select first (under the target as timed or not), each once; returns the numbers of the trials
    added (time them with :func:`check_latency`).

    ``on_reaimed(parent, added, reason)``: after each, with the added trial, or ``None`` and why not.
    """
    top = config.latency_reaim if top is None else top
    if top <= 0:
        return []
    record = StudyRecord.from_study(study)
    goal = config.latency * (1.0 - config.latency_margin)
    fingerprint = device_fingerprint(device)
    checks = {c["trial"]: c for c in record.latency_checks or []
              if c.get("device") == fingerprint and c.get("batch") == config.latency_batch
              and c.get("mode", "static") == config.latency_mode and c.get("predicted") and c.get("measured")}
    flops_aim = config.flops_budget().aim  # a latency target is refused with a range of FLOPs targets
    trials = study.get_trials(deepcopy=False)
    done = {TrialRecord.from_trial(t).reaimed_from for t in trials}

    def off_aim(t: FrozenTrial) -> bool:
        measured = checks[t.number]["measured"]
        if measured > goal * (1.0 + REAIM_SLACK):
            return True  # the plan misses the target, or nearly: it must cut more
        if measured >= goal * (1.0 - REAIM_SLACK):
            return False
        # It cut more than it needed to, but only where the latency solve cut below what the FLOPs aim allows.
        lowered = TrialRecord.from_trial(t).latency_flops_aim
        return lowered is not None and lowered < flops_aim * (1.0 - 1e-6)

    timed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.number in checks
             and not is_added(t) and t.number not in done and off_aim(t)]
    # Best on select first, whether or not the timing found them under the target: re-aimed, a shape over it
    # may be the best one that is.
    parents = sorted(timed, key=lambda t: (-(accuracy_of(t) or 0.0), t.number))[:top]
    return add_children(study, parents,
                        lambda parent: reaim(parent, checks[parent.number]["measured"] / checks[parent.number]["predicted"]),
                        "reaimed_from", (ltmp_core.Unreachable, optuna.TrialPruned), on_reaimed)
