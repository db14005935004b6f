"""One trial: sample a plan, patch a copy of the base model, set its thresholds, tune, score on the select split.

How the thresholds start (:class:`search.finetune.Recipe` ``start``):

- ``solve``: one shift common to every merge threshold (or every prune threshold in a plan without
  merges) is solved on the calibration batch so that the measured FLOPs ratio is the aim
  (:func:`ltmp_core.calibrate_to_flops`). A plan that cannot reach the aim is pruned here,
  before any tuning.
- ``calibrate``: every layer is put on the budget the space gave it.
- ``plan``: the thresholds the space wrote into the plan (LTMP's 0.9 and 0).

Then ``steps`` tuning steps (none for a space that does not tune), and the score: top-1 on the whole
select split with tokens really removed, with the measured FLOPs ratio as the constraint. With a
range of targets (``--flops LO:HI``) the study has two objectives, top-1 (up) and the measured FLOPs
ratio (down), and every trial draws its own target from the part of the range its shape reaches
(:meth:`Objective._range_budget`).

With a latency target (``--latency R``), the study's latency model of this device
(:mod:`search.setup.latency`) predicts each plan's time over the unreduced model's: where a trial solved
for its FLOPs aim is predicted slower than ``R`` less ``--latency-margin``, its shared shift is solved again
for that latency (:meth:`Objective._meet_latency`), and the scored plan's prediction is a second constraint. With
``--latency-mode static`` (the default) the latency is static mode's, so such a trial is scored in static
mode: each layer keeps, as a fixed count, what its solved threshold kept of the calibration batch
(:meth:`Objective._as_static`). With ``--latency-mode dynamic`` the trial is scored in dynamic mode and its
latency predicted from every calibration image's counts under its thresholds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial
import torch.nn as nn

import ltmp_core
from ltmp_core import LTMPError
from spaces import Infeasible, get_space, suggest

from ..setup.budget import COARSE_IMAGES, RESOLVE_STEP, Budget
from ..setup.config import StudyConfig
from ..setup.data import StudyData
from ..setup.evaluation import evaluate, unreduced_accuracy
from ..setup.latency import LatencyModel, counts_on, dynamic_kinds
from .compute import ComputeMeter, count_images
from .record import TrialRecord
from .tuning import NonFiniteLoss, Recipe, tune_thresholds
from ..setup.workbench import Workbench

__all__ = ["Objective", "TrialHooks", "Refined", "METRIC_NAME", "METRIC_NAMES", "recipe_for", "range_position"]

METRIC_NAME = "top-1 accuracy"
#: The objectives of a study over a range of targets.
METRIC_NAMES = (METRIC_NAME, "FLOPs ratio")
#: In a study over a range, aims stay this fraction above a shape's predicted floor: thresholds solved
#: on real images rarely reach the floor that budgets at their limits predict.
RANGE_HEADROOM = 0.05


def range_position(number: int) -> float:
    """Where trial ``number`` of a study over a range of targets aims, in [0, 1): the base-2 van der
    Corput sequence (0, 1/2, 1/4, 3/4, 1/8, ...), so every prefix of a study's trials, and so every
    study size, spreads its aims evenly over the range."""
    position, scale = 0.0, 0.5
    while number:
        number, bit = divmod(number, 2)
        position += bit * scale
        scale /= 2
    return position


@dataclass
class TrialHooks:
    """Progress callbacks (the command line draws bars with them)."""

    on_trial_start: Callable[[int], None] = lambda number: None
    on_step: Callable[[int, int], None] = lambda step, steps: None
    on_phase: Callable[[str], None] = lambda phase: None
    #: The study is open: how many of its trials had finished before this run.
    on_study: Callable[[int], None] = lambda finished: None


@dataclass
class Refined:
    """What :meth:`Objective.refine` gave: the trial's value, its user attributes (what a trial records,
    compute and ``refined_from`` included) and its FLOPs constraint, for ``optuna.trial.create_trial``."""

    value: float
    user_attrs: dict[str, Any]
    constraints: dict[str, float]


def recipe_for(config: StudyConfig, space_budget: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """The study's tuning recipe, then what the space's plan asks for (``plan.meta["tuning"]``)."""
    base = Recipe(steps=config.trial_steps, lr=config.lr, budget=space_budget if config.budget == "space" else config.budget,
                  budget_weight=config.budget_weight, tau=config.tau)
    return base.updated(overrides)


class Objective:
    """Callable for ``study.optimize``: returns select-split top-1 (and, over a range of targets, the
    measured FLOPs ratio), sets the FLOPs constraint.

    The base model is set up once (:class:`search.setup.workbench.Workbench`); each trial works on a deep copy.
    """

    def __init__(self, bench: Workbench, *, hooks: TrialHooks | None = None, recorder: Any = None) -> None:
        self.bench = bench
        self.config = bench.config
        self.recorder = recorder  # search.present.dashboard.TrialRecorder: notes and pictures for the dashboard
        self.device, self.amp, self.data, self.base = bench.device, bench.amp, bench.data, bench.base
        self.geometry = bench.geometry
        self.unreduced_macs = ltmp_core.unreduced_macs(self.geometry)
        self.space = get_space(self.config.space)
        self.hooks = hooks or TrialHooks()
        self.calibration = self.data.calibration_batch(self.config.calib_images, self.config.seed).to(self.device)
        self.multi = self.config.flops_min is not None
        self._reported: set[tuple[int, int]] = set()
        #: The study's latency model of this device (:meth:`use_latency`); ``None`` without ``--latency``.
        self.latency: LatencyModel | None = None
        #: What the latency model's predictions are multiplied by (a re-aimed trial's ``latency_correction``).
        self._latency_scale = 1.0
        #: The largest ``stage_stride`` trials sample (``--stage-stride``, or what the study decided: :meth:`use_stride`).
        self.max_stride = self.config.stage_stride or 1

    def use_stride(self, stride: int) -> None:
        """Let trials sample ``stage_stride`` up to ``stride`` (1: every reducing block runs)."""
        self.max_stride = stride

    def use_latency(self, model: LatencyModel) -> None:
        """Predict every plan's latency with ``model`` (a study with ``--latency``)."""
        self.latency = model

    def _predicted_latency(self, plan: ltmp_core.ReductionPlan) -> float:
        return self.latency.ratio(plan, self.geometry) * self._latency_scale

    def _calibrated_latency(self, model: nn.Module, images: torch.Tensor) -> float:
        """Predicted latency ratio of the model's thresholds on ``images``: for static mode, of the fixed
        counts they keep on average; for dynamic mode, of every image's counts."""
        ltmp_core.set_mode(model, "dynamic")
        return self._latency_of_counts(model, counts_on(model, [images.to(self.device)]))

    def _latency_of_counts(self, model: nn.Module, counts: Any) -> float:
        """Predicted latency ratio of the token counts ``[depth + 1, images]`` the model's thresholds left."""
        if self.latency.mode == "dynamic":
            return self.latency.ratio_of_counts(counts, dynamic_kinds(ltmp_core.get_plan(model))) * self._latency_scale
        kept = counts[1:].mean(1).tolist()
        return self._predicted_latency(ltmp_core.measured_plan(ltmp_core.get_plan(model), kept, self.geometry))

    def _latency_after_forward(self, model: nn.Module) -> float:
        """:meth:`_calibrated_latency` of the images the model ran last (what the shift solver reads)."""
        return self._latency_of_counts(model, ltmp_core.token_counts(model).float().cpu().numpy())

    @classmethod
    def open(cls, config: StudyConfig, hooks: TrialHooks | None = None,
             on_base_epoch: Callable[[int, int, float], None] | None = None, data: StudyData | None = None,
             recorder: Callable[[StudyData], Any] | None = None) -> "Objective":
        """The objective of a study: its workbench (data, base model; trained and cached for the digits
        preset); ``recorder(data)`` makes what writes every finished trial's dashboard note and pictures
        (:class:`search.present.dashboard.TrialRecorder`)."""
        bench = Workbench.open(config, data=data, on_base_epoch=on_base_epoch)
        return cls(bench, hooks=hooks, recorder=None if recorder is None else recorder(bench.data))

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        self.hooks.on_trial_start(trial.number)
        return self._trial(trial)

    def refine(self, parent: FrozenTrial, steps: int) -> Refined:
        """Refine a finished trial's shape: its parameters run again as a trial does (the same plan, the
        same start), then ``steps`` tuning steps with the global FLOPs term (the study's ``--budget``
        where it names one), no pruner, then the shared shift re-solved on the calibration batch so the
        FLOPs sit on the aim again, then the score on select. Every pass is counted as a trial's are.

        Raises what a trial raises (``optuna.TrialPruned`` for a shape that cannot reach the aim,
        :class:`search.study.tuning.NonFiniteLoss`, ``ltmp_core.Unreachable`` when the re-solve cannot
        reach it after tuning); the caller decides.
        """
        if self.multi:
            raise LTMPError("refine: not for a study over a range of targets")
        self.hooks.on_trial_start(parent.number)  # the progress shows the parent's number while it refines
        trial = optuna.trial.FixedTrial(dict(parent.params), number=parent.number)
        TrialRecord.write(trial, refined_from=parent.number)
        value = self._trial(trial, refine=steps)
        return Refined(float(value), dict(trial.user_attrs), dict(trial.constraints))

    def reaim(self, parent: FrozenTrial, correction: float) -> Refined:
        """Run a timed trial's shape again with every latency prediction multiplied by ``correction`` (its
        measured over its predicted latency ratio): the FLOPs aim its thresholds are solved for moves to where
        the device, not the model, puts the latency target. Otherwise as the trial ran (same plan, start and
        tuning), no pruner, no pictures; every pass counted.

        Raises what a trial raises (``optuna.TrialPruned`` for a shape that cannot reach the target); the
        caller decides.
        """
        if self.latency is None:
            raise LTMPError("reaim: the study has no latency target")
        if not correction > 0:
            raise LTMPError(f"reaim: the correction must be positive, got {correction}")
        self.hooks.on_trial_start(parent.number)
        trial = optuna.trial.FixedTrial(dict(parent.params), number=parent.number)
        TrialRecord.write(trial, reaimed_from=parent.number, latency_correction=correction)
        self._latency_scale = correction
        try:
            value = self._trial(trial, added=True)
        finally:
            self._latency_scale = 1.0
        return Refined(float(value), dict(trial.user_attrs), dict(trial.constraints))

    def _trial(self, trial: optuna.Trial | optuna.trial.FixedTrial, refine: int | None = None,
               added: bool = False) -> float | tuple[float, float]:
        c = self.config
        seed = c.seed + trial.number
        TrialRecord.write(trial, seed=seed, device=str(self.device))
        meter = ComputeMeter()
        try:
            return self._plan_and_run(trial, seed, meter, refine, added or refine is not None)
        finally:
            # Scored, pruned or failed: what the trial ran is part of the study's compute.
            TrialRecord.write(trial, images_processed=meter.images, forward_equivalents=meter.forward_equivalents)

    def _suggest(self, trial: optuna.Trial, aim: float) -> ltmp_core.ReductionPlan:
        c = self.config
        try:
            # Asked again in one trial, the sampler's parameters keep their values: the same shape.
            return suggest(c.space, trial, self.geometry, aim, ops=c.ops, importance=c.importance,
                           max_stride=self.max_stride)
        except Infeasible as e:
            self._infeasible(trial, e.ops, str(e))

    def _range_budget(self, trial: optuna.Trial) -> tuple[Budget, ltmp_core.ReductionPlan]:
        """A trial's target in a study over a range: drawn from the part of the range its shape reaches.

        The shape is sampled first (at the top of the range, the easiest target); its lowest predicted
        FLOPs ratio (every reducing layer at its floor) bounds the range from below. The trial's aim is
        then spread over what is left by its position in a low-discrepancy sequence of trial numbers
        (:func:`range_position`), so the trials of a study cover the range evenly and none is spent on a
        target its shape cannot reach. Only a shape that cannot reach even the top is pruned.
        """
        c = self.config
        top = c.flops_budget(c.flops)
        plan = self._suggest(trial, top.aim)
        floors = [1.0 if op == "none" else ltmp_core.lowest_keep(op, self.geometry.num_patches) for op in plan.ops]
        lowest = ltmp_core.plan_flops_ratio(plan.with_keeps(floors), static=not self.space.tune)
        # Plans land on their aim: spread the aims, so the measured ratios cover [flops_min, flops].
        low_aim = max(c.flops_min, lowest * (1.0 + RANGE_HEADROOM))
        if low_aim >= top.aim:
            return top, plan
        aim = low_aim + range_position(trial.number) * (top.aim - low_aim)
        budget = c.flops_budget(min(c.flops, aim / (1.0 - top.margin)))
        return budget, self._suggest(trial, budget.aim)

    def _plan_and_run(self, trial: optuna.Trial, seed: int, meter: ComputeMeter,
                      refine: int | None = None, added: bool = False) -> float | tuple[float, float]:
        c = self.config
        if self.multi:
            budget, plan = self._range_budget(trial)
        else:
            budget = c.flops_budget()
            plan = self._suggest(trial, budget.aim)
        TrialRecord.write(trial, target=budget.target)
        recipe = recipe_for(c, self.space.budget, plan.meta.get("tuning"))
        if refine is not None:  # LTMP's kind of tuning: the global FLOPs term, unless the study names one
            recipe = replace(recipe, steps=refine, budget="global" if c.budget == "space" else c.budget)
        plan = replace(plan, model=c.model, meta={**plan.meta, **budget.to_meta()})
        plan = plan.with_layers(tau=[recipe.tau] * plan.depth)
        TrialRecord.write(trial, ops=list(plan.ops),
                          predicted_flops_ratio=ltmp_core.plan_flops_ratio(plan, static=not self.space.tune))
        try:
            return self._run(trial, plan, recipe, seed, c.batch_size, budget, meter, added, bool(refine))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            half = max(1, c.batch_size // 2)
            TrialRecord.write(trial, oom_retry_batch_size=half)
            try:
                return self._run(trial, plan, recipe, seed, half, budget, meter, added, bool(refine))
            except torch.cuda.OutOfMemoryError:
                TrialRecord.write(trial, fail_reason=f"CUDA out of memory at batch size {c.batch_size} and again at {half}")
                raise

    @staticmethod
    def _infeasible(trial: optuna.Trial, ops: list[str], reason: str) -> None:
        TrialRecord.write(trial, ops=ops, pruned_reason=reason)
        raise optuna.TrialPruned(reason)

    def _run(self, trial: optuna.Trial, plan: ltmp_core.ReductionPlan, recipe: Recipe, seed: int, batch_size: int,
             budget: Budget, meter: ComputeMeter, added: bool = False,
             resolve: bool = False) -> float | tuple[float, float]:
        """One trial's work on its plan: cut and patch a copy of the base model, start its thresholds,
        tune them, score it; ``meter`` counts what it runs. ``added`` (a refined or re-aimed trial): no
        pruner, no dashboard pictures; ``resolve``: the shared shift re-solved after tuning (:meth:`refine`)."""
        torch.manual_seed(seed)
        start = time.perf_counter()
        model, plan = self._reduced(plan, meter)
        mode = "static"
        if self.space.tune:
            mode = "dynamic"
            budget = self._start(trial, model, plan, recipe, budget, meter)
            plan = replace(plan, meta={**plan.meta, **budget.to_meta()})
            self._tune(trial, model, recipe, seed, batch_size, budget, meter, report=not added)
            if resolve:
                self._resolve(model, budget, meter)
        TrialRecord.write(trial, recipe=asdict(recipe))
        tune_seconds = time.perf_counter() - start
        return self._score(trial, model, plan, recipe, mode, batch_size, budget, meter, tune_seconds,
                           pictures=not added)

    def _reduced(self, plan: ltmp_core.ReductionPlan,
                 meter: ComputeMeter) -> tuple[nn.Module, ltmp_core.ReductionPlan]:
        """A copy of the base model cut to the plan's widths and patched (static mode). The cut's work
        is counted: the Taylor criterion's forward and backward, the recovery's steps and teacher."""
        if plan.cuts_width:
            self.hooks.on_phase("cut width")
            cut = self.bench.width_cut(plan)
            if cut.importance == "taylor":
                meter.step(cut.calib_images)
            for _ in range(cut.recover_steps):
                meter.step(cut.recover_batch, teacher=True)
        return self.bench.reduced(plan, "static", teacher=self.base)

    def _start(self, trial: optuna.Trial, model: nn.Module, plan: ltmp_core.ReductionPlan, recipe: Recipe,
               budget: Budget, meter: ComputeMeter) -> Budget:
        """Set the thresholds where the recipe starts them (every pass over the calibration batch is
        counted); returns the trial's budget. An unreachable aim prunes the trial, except in a study
        over a range, where a target the prediction put under what the images reach moves up to what
        they reach (while that is in the range)."""
        self.hooks.on_phase("calibrate")
        images = count_images(model)
        try:
            if recipe.start == "plan":
                ltmp_core.set_mode(model, "dynamic")
            else:
                try:
                    if recipe.start == "solve":
                        budget = self._solve(model, budget, trial)
                    else:
                        ltmp_core.calibrate(model, self.calibration)
                except ltmp_core.Unreachable as e:
                    self._infeasible(trial, list(plan.ops), str(e).removeprefix("flops: ").removeprefix("latency: "))
        finally:
            meter.forward(images())
        TrialRecord.write(trial, target=budget.target, calibrated_plan=ltmp_core.get_plan(model).to_dict())
        return budget

    def _solve(self, model: nn.Module, budget: Budget, trial: optuna.Trial | None = None) -> Budget:
        budget = self._solve_flops(model, budget)
        if self.latency is not None:
            aim = self._meet_latency(model, budget.aim)
            if trial is not None:
                TrialRecord.write(trial, latency_flops_aim=aim)
        return budget

    def _meet_latency(self, model: nn.Module, aim: float) -> float:
        """Cut more than the FLOPs aim asks until the predicted latency meets the latency target less its
        margin: the shared threshold shift is solved for the latency itself (from the FLOPs solution
        outwards, :func:`ltmp_core.calibrate_to_flops` with ``measure``), on the first
        :data:`~search.setup.budget.COARSE_IMAGES` calibration images and then, from there, on the whole
        calibration batch.
        Returns the FLOPs ratio the calibration batch costs then (``aim`` when the FLOPs aim met the
        latency target already).

        Raises:
            Unreachable: not even the lowest FLOPs the shape reaches are predicted fast enough.
        """
        c = self.config
        goal = c.latency * (1.0 - c.latency_margin)
        if self._calibrated_latency(model, self.calibration[:COARSE_IMAGES]) <= goal:
            return aim
        try:
            ltmp_core.calibrate_to_flops(model, self.calibration, goal, near=RESOLVE_STEP,
                                         measure=self._latency_after_forward, coarse=COARSE_IMAGES)
        except ltmp_core.Unreachable as e:
            raise ltmp_core.Unreachable(
                f"latency: this shape is predicted at a latency ratio of {e.lowest:.3f} even at its lowest FLOPs, "
                f"above the target {c.latency:g} less its margin", e.lowest) from None
        return min(aim, float(ltmp_core.image_macs(model).mean()) / self.unreduced_macs)

    def _solve_flops(self, model: nn.Module, budget: Budget) -> Budget:
        c = self.config
        try:
            ltmp_core.calibrate_to_flops(model, self.calibration, budget.aim, coarse=COARSE_IMAGES)
            return budget
        except ltmp_core.Unreachable as e:
            aim = e.lowest * (1.0 + RANGE_HEADROOM)
            if not self.multi or aim >= c.flops_budget(c.flops).aim:
                raise
        budget = c.flops_budget(min(c.flops, aim / (1.0 - budget.margin)))
        ltmp_core.calibrate_to_flops(model, self.calibration, budget.aim, coarse=COARSE_IMAGES)
        return budget

    def _resolve(self, model: nn.Module, budget: Budget, meter: ComputeMeter) -> None:
        """After tuning: one shift of the tuned thresholds re-solved so the calibration batch costs the
        aim (the tuned differences between layers stay; searched from the tuned thresholds outwards, which
        the budget term kept near the aim); its passes are counted."""
        self.hooks.on_phase("re-solve")
        images = count_images(model)
        try:
            ltmp_core.calibrate_to_flops(model, self.calibration, budget.aim, near=RESOLVE_STEP,
                                         coarse=COARSE_IMAGES)
            if self.latency is not None:  # and below the latency target again, as a trial's solve is
                self._meet_latency(model, budget.aim)
        finally:
            meter.forward(images())

    def _tune(self, trial: optuna.Trial, model: nn.Module, recipe: Recipe, seed: int, batch_size: int,
              budget: Budget, meter: ComputeMeter, report: bool = True) -> None:
        """The recipe's tuning steps on the thresholds, each counted as it ends. With ``report``, the
        pruner sees the trial's intermediate scores."""
        c = self.config

        def on_step(step: int) -> None:
            meter.step(batch_size, teacher=c.distill)
            self.hooks.on_step(step, recipe.steps)
            # The pruner sees a trial only once it has tuned (never its calibrated start).
            if report and step % c.eval_every == 0 and step < recipe.steps and not self.multi:
                self._report(trial, model, step, batch_size, meter)

        if recipe.steps:
            self.hooks.on_phase("tune")
        try:
            tuned = tune_thresholds(
                model, self.data.train_batches(batch_size, seed), recipe=recipe, target=budget.aim,
                teacher=self.base if c.distill else None, device=self.device, amp=self.amp, on_step=on_step,
            )
        except NonFiniteLoss as e:
            TrialRecord.write(trial, fail_reason=str(e))
            raise
        TrialRecord.write(trial, tune_task_loss=tuned.task_loss, tune_budget_loss=tuned.budget_loss)

    def _score(self, trial: optuna.Trial, model: nn.Module, plan: ltmp_core.ReductionPlan, recipe: Recipe,
               mode: str, batch_size: int, budget: Budget, meter: ComputeMeter,
               tune_seconds: float, pictures: bool = True) -> float | tuple[float, float]:
        """Top-1 on the select split with tokens removed; the measured FLOPs ratio is the constraint, and
        with a latency target the plan's predicted latency ratio too."""
        c = self.config
        if self.latency is not None and mode == "dynamic" and self.latency.mode == "static":
            model, mode = self._as_static(model, plan, meter), "static"
        self.hooks.on_phase("score")
        result = evaluate(model, self.data.holdout_batches(batch_size), device=self.device, amp=self.amp, mode=mode)
        meter.forward(result.images)
        ratio = result.macs / self.unreduced_macs
        trial.set_constraint("flops", ratio - budget.target)
        final = replace(ltmp_core.get_plan(model), meta=plan.meta)
        if recipe.start != "calibrate" and mode == "dynamic":
            # Thresholds, not budgets, decided the counts: the budgets (what static mode keeps) become
            # the mean fractions the thresholds kept on the select split.
            final = ltmp_core.measured_plan(final, result.kept_tokens, self.geometry)
        feasible = ratio <= budget.target
        latency: dict[str, float] = {}
        if self.latency is not None:
            if mode == "dynamic":  # the thresholds' counts on the calibration images, image by image
                predicted = self._calibrated_latency(model, self.calibration)
                meter.forward(len(self.calibration))
            else:
                predicted = self._predicted_latency(final)
            trial.set_constraint("latency", predicted - c.latency)
            latency = dict(predicted_latency_ratio=predicted, latency_constraint=predicted - c.latency)
            feasible = feasible and predicted <= c.latency
        record = TrialRecord(
            constraint=ratio - budget.target, accuracy=result.accuracy, flops_ratio=ratio, gmacs=result.macs / 1e9,
            feasible=feasible, kept_tokens=result.kept_tokens, eval_mode=mode, plan=final.to_dict(),
            time_tune_s=tune_seconds, time_eval_s=result.seconds, **latency,
        )
        TrialRecord.write(trial, **record.to_user_attrs())
        if self.recorder is not None and pictures:
            self.recorder.record(trial, model, mode, record.plan, result.kept_tokens, result.accuracy, ratio,
                                 budget.target)
        if self.multi:
            return result.accuracy, ratio
        if self.space.tune and recipe.steps:
            trial.report(result.accuracy, recipe.steps)
        return result.accuracy

    def _as_static(self, model: nn.Module, plan: ltmp_core.ReductionPlan, meter: ComputeMeter) -> nn.Module:
        """The model in the mode its latency is predicted and timed in (``--latency-mode static``): each
        layer keeps what its solved threshold kept of the calibration batch, as a fixed count. A latency
        study scores this, so the plan it names is the plan that runs at the latency it names."""
        ltmp_core.set_mode(model, "dynamic")
        with torch.no_grad():
            _, kept = ltmp_core.measure_flops(model, [self.calibration.to(self.device)])
        meter.forward(len(self.calibration))
        fixed = replace(ltmp_core.measured_plan(ltmp_core.get_plan(model), kept, self.geometry), meta=plan.meta)
        ltmp_core.remove_plan(model)
        return ltmp_core.apply_plan(model, fixed, mode="static")

    def _report(self, trial: optuna.Trial, model: nn.Module, step: int, batch_size: int,
                meter: ComputeMeter) -> None:
        if (trial.number, step) in self._reported:  # a retry after running out of memory
            return
        self._reported.add((trial.number, step))
        quick = evaluate(model, self.data.holdout_batches(batch_size, limit=self.config.eval_images),
                         device=self.device, amp=self.amp)
        meter.forward(quick.images)
        trial.report(quick.accuracy, step)
        if trial.should_prune():
            TrialRecord.write(trial, pruned_reason=f"stopped by the pruner: accuracy {quick.accuracy:.3f} at step {step}")
            raise optuna.TrialPruned()

    def base_accuracy(self) -> float:
        """Select-split accuracy of the unreduced base model."""
        return unreduced_accuracy(self.base, self.data.holdout_batches(self.config.batch_size), device=self.device,
                                  amp=self.amp)[0]

