"""What a study and each of its trials record in Optuna's storage: one declaration of every user
attribute, written and read through these dataclasses only.

Optuna keeps a trial's parameters, values, state and intermediate values itself; everything else this
project knows of a trial (its plan, measured FLOPs, why it was pruned or failed, ...) is a user
attribute, which the dashboard also shows. A trial writes its record in steps (what it knows when it
starts, when it is pruned or fails, when it is scored): :meth:`TrialRecord.write` sets some fields,
checked against the declaration; every reader takes :meth:`TrialRecord.from_trial`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["TrialRecord", "StudyRecord"]


@dataclass(frozen=True)
class TrialRecord:
    """The user attributes of one trial; ``None``: not recorded (yet, or for this kind of trial).

    Attributes:
        slot: The trial is one of the study's slots (:mod:`search.study.worker`); a retry keeps it.
        seed_of: For the study's first trials, the published method whose plan shape it runs
            (``LTMP``, ``ToMe``, ``TPS``).
        refined_from: For a trial of the refine stage (:mod:`search.study.refine`), the number of the
            sampled trial whose shape it refined; such a trial is not one of the study's slots and
            does not count towards ``--n-trials``.
        reaimed_from: For a trial added after the latency checks (:func:`search.study.latency_study.reaim_checked`),
            the number of the timed trial whose shape it runs again, aimed by what that trial measured; not a slot
            either.
        latency_correction: Measured over predicted latency ratio of the trial it was re-aimed from: its latency
            predictions are the model's times this factor.
        worker: ``host:pid`` of the process that ran it.
        seed: Seed of the trial's data order and random draws (the study's seed plus its number).
        device: Where it ran.
        target: Its FLOPs target (a study over a range of targets draws one per trial).
        ops: The operation of every block.
        predicted_flops_ratio: The plan's FLOPs ratio from its budgets, before calibration.
        oom_retry_batch_size: The batch size of the retry after CUDA ran out of memory.
        calibrated_plan: The plan with its thresholds as calibration set them, before tuning.
        tune_task_loss: Mean task loss of the tuning steps.
        tune_budget_loss: Mean budget term of the tuning steps.
        recipe: The tuning recipe it ran (:class:`search.finetune.Recipe`).
        constraint: Measured FLOPs ratio minus the target (feasible when <= 0); Optuna's constraint,
            mirrored here because optuna-dashboard 0.21 reads constraints from user attributes.
        accuracy: Top-1 on the select split.
        flops_ratio: Measured FLOPs over the unreduced model's, on the select split.
        gmacs: Measured GMACs per image.
        feasible: ``flops_ratio <= target`` (and, with a latency target, ``predicted_latency_ratio`` at or
            under it).
        predicted_latency_ratio: With a latency target: the scored plan's time over the unreduced model's,
            predicted by the study's latency model of this device (static counts from its budgets).
        latency_constraint: ``predicted_latency_ratio`` minus the latency target (Optuna's constraint
            ``latency``, mirrored).
        latency_flops_aim: The FLOPs ratio the calibration batch costs once the trial's shift was solved
            for the latency target (its FLOPs aim where that alone met the target).
        kept_tokens: Mean tokens after each block (prefix included), on the select split.
        eval_mode: ``dynamic`` (thresholds) or ``static`` (fixed counts).
        plan: The plan as it was scored (``ReductionPlan.to_dict``), with its budget in ``meta``.
        images_processed: Images the trial passed forward through its model or its teacher, every pass
            counted (calibration, tuning, intermediate and final scores, a width cut); recorded for
            pruned and failed trials too (:mod:`search.study.compute`).
        forward_equivalents: The same passes in units of one image's forward, backward passes
            included (a study's compute, for comparisons at equal compute).
        time_tune_s: Seconds of calibration and tuning.
        time_eval_s: Seconds of the final score.
        pruned_reason: Why it was pruned (an unreachable shape, or the pruner).
        fail_reason: Why it failed.
        artifact_error: Why its dashboard pictures could not be saved.
    """

    slot: bool | None = None
    seed_of: str | None = None
    refined_from: int | None = None
    reaimed_from: int | None = None
    latency_correction: float | None = None
    worker: str | None = None
    seed: int | None = None
    device: str | None = None
    target: float | None = None
    ops: list[str] | None = None
    predicted_flops_ratio: float | None = None
    oom_retry_batch_size: int | None = None
    calibrated_plan: dict[str, Any] | None = None
    tune_task_loss: float | None = None
    tune_budget_loss: float | None = None
    recipe: dict[str, Any] | None = None
    constraint: float | None = None
    accuracy: float | None = None
    flops_ratio: float | None = None
    gmacs: float | None = None
    feasible: bool | None = None
    predicted_latency_ratio: float | None = None
    latency_constraint: float | None = None
    latency_flops_aim: float | None = None
    kept_tokens: list[float] | None = None
    eval_mode: str | None = None
    plan: dict[str, Any] | None = None
    images_processed: int | None = None
    forward_equivalents: int | None = None
    time_tune_s: float | None = None
    time_eval_s: float | None = None
    pruned_reason: str | None = None
    fail_reason: str | None = None
    artifact_error: str | None = None

    def to_user_attrs(self) -> dict[str, Any]:
        """The recorded fields, as Optuna stores them."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_trial(cls, trial: Any) -> "TrialRecord":
        """The record of a trial (an ``optuna.Trial`` or ``FrozenTrial``); attributes it does not declare
        (written by other tools) are left out."""
        attrs = trial.user_attrs
        return cls(**{name: attrs[name] for name in _TRIAL_FIELDS if name in attrs})

    @classmethod
    def write(cls, trial: Any, **values: Any) -> None:
        """Record ``values`` on a running trial (names are checked: an undeclared one is a TypeError)."""
        for name, value in cls(**values).to_user_attrs().items():
            trial.set_user_attr(name, value)

    @property
    def reason(self) -> str | None:
        """Why the trial was pruned or failed."""
        return self.pruned_reason or self.fail_reason


_TRIAL_FIELDS = tuple(f.name for f in fields(TrialRecord))


@dataclass(frozen=True)
class StudyRecord:
    """The user attributes of a study.

    Attributes:
        uid: Tells this study from a deleted one of the same name (the project's tables key on it).
        config: The resolved configuration (:meth:`search.setup.config.StudyConfig.to_dict`).
        unreduced_gmacs: GMACs per image of the unreduced model.
        base: The base model: name, where its weights came from, its select-split accuracy.
        seed_trials: How many of the first trials run published plan shapes.
        skipped_images: Unreadable images the study's data skipped.
        latency_models: Latency models of the devices the study ran on
            (:meth:`search.setup.latency.LatencyModel.to_dict`), keyed by device fingerprint, batch and
            mode (:func:`search.setup.latency.model_key`): every worker on the same kind of device reads it.
        latency_checks: The best trials timed for real after a run (plan and unreduced model interleaved):
            one dict each with ``trial``, ``predicted``, ``measured``, ``spread``, ``error`` (predicted over
            measured, minus 1), ``feasible`` (measured at or under the target), ``device``, ``batch``.
        stage_stride: The largest ``stage_stride`` the trials sample, where the study decided it
            (:func:`search.study.latency_study.study_stride`), with the latency model's predictions that
            decided it (``stride_predictions``: FLOPs ratio -> stride -> predicted latency ratio).
    """

    uid: str | None = None
    config: dict[str, Any] | None = None
    unreduced_gmacs: float | None = None
    base: dict[str, Any] | None = None
    seed_trials: int | None = None
    skipped_images: list[str] | None = None
    latency_models: dict[str, Any] | None = None
    latency_checks: list[dict[str, Any]] | None = None
    stage_stride: int | None = None
    stride_predictions: dict[str, dict[str, float]] | None = None

    @classmethod
    def from_study(cls, study: Any) -> "StudyRecord":
        """The record of a study (an ``optuna.Study`` or a ``StudySummary``)."""
        attrs = study.user_attrs
        return cls(**{name: attrs[name] for name in _STUDY_FIELDS if name in attrs})

    @classmethod
    def write(cls, study: Any, **values: Any) -> None:
        """Record ``values`` on a study (names are checked: an undeclared one is a TypeError)."""
        for name, value in asdict(cls(**values)).items():
            if name in values:
                study.set_user_attr(name, value)

    @property
    def target(self) -> float | None:
        """The FLOPs ratio the user asked the study for."""
        return (self.config or {}).get("flops")

    @property
    def latency_target(self) -> float | None:
        """The latency ratio the user asked the study for (``None``: no latency budget)."""
        return (self.config or {}).get("latency")

    def measured_latency(self) -> dict[int, float]:
        """Trial number -> its measured latency ratio (the last check of it)."""
        return {c["trial"]: c["measured"] for c in self.latency_checks or []}


_STUDY_FIELDS = tuple(f.name for f in fields(StudyRecord))
