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
ratio (down), and every trial draws its own target in the range.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import optuna
import torch
import torch.nn as nn

import ltmp_core
from spaces import Infeasible, get_space, suggest

from ..setup.budget import Budget
from ..setup.config import StudyConfig
from ..setup.data import StudyData
from ..setup.evaluation import evaluate, unreduced_accuracy
from .compute import ComputeMeter
from .record import TrialRecord
from .tuning import NonFiniteLoss, Recipe, tune_thresholds
from ..setup.workbench import Workbench

__all__ = ["Objective", "TrialHooks", "METRIC_NAME", "METRIC_NAMES", "recipe_for"]

METRIC_NAME = "top-1 accuracy"
#: The objectives of a study over a range of targets.
METRIC_NAMES = (METRIC_NAME, "FLOPs ratio")


@dataclass
class TrialHooks:
    """Progress callbacks (the command line draws bars with them)."""

    on_trial_start: Callable[[int], None] = lambda number: None
    on_step: Callable[[int, int], None] = lambda step, steps: None
    on_phase: Callable[[str], None] = lambda phase: None
    #: The study is open: how many of its trials had finished before this run.
    on_study: Callable[[int], None] = lambda finished: None


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
        c = self.config
        self.hooks.on_trial_start(trial.number)
        seed = c.seed + trial.number
        budget = c.flops_budget(trial.suggest_float("flops_target", c.flops_min, c.flops) if self.multi else None)
        TrialRecord.write(trial, seed=seed, device=str(self.device), target=budget.target)
        meter = ComputeMeter()
        try:
            return self._plan_and_run(trial, seed, budget, meter)
        finally:
            # Scored, pruned or failed: what the trial ran is part of the study's compute.
            TrialRecord.write(trial, images_processed=meter.images, forward_equivalents=meter.forward_equivalents)

    def _plan_and_run(self, trial: optuna.Trial, seed: int, budget: Budget,
                      meter: ComputeMeter) -> float | tuple[float, float]:
        c = self.config
        try:
            plan = suggest(c.space, trial, self.geometry, budget.aim, ops=c.ops, importance=c.importance)
        except Infeasible as e:
            self._infeasible(trial, e.ops, str(e))
        recipe = recipe_for(c, self.space.budget, plan.meta.get("tuning"))
        plan = replace(plan, model=c.model, meta={**plan.meta, **budget.to_meta()})
        plan = plan.with_layers(tau=[recipe.tau] * plan.depth)
        TrialRecord.write(trial, ops=list(plan.ops),
                          predicted_flops_ratio=ltmp_core.plan_flops_ratio(plan, static=not self.space.tune))
        try:
            return self._run(trial, plan, recipe, seed, c.batch_size, budget, meter)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            half = max(1, c.batch_size // 2)
            TrialRecord.write(trial, oom_retry_batch_size=half)
            try:
                return self._run(trial, plan, recipe, seed, half, budget, meter)
            except torch.cuda.OutOfMemoryError:
                TrialRecord.write(trial, fail_reason=f"CUDA out of memory at batch size {c.batch_size} and again at {half}")
                raise

    @staticmethod
    def _infeasible(trial: optuna.Trial, ops: list[str], reason: str) -> None:
        TrialRecord.write(trial, ops=ops, pruned_reason=reason)
        raise optuna.TrialPruned(reason)

    def _run(self, trial: optuna.Trial, plan: ltmp_core.ReductionPlan, recipe: Recipe, seed: int, batch_size: int,
             budget: Budget, meter: ComputeMeter) -> float | tuple[float, float]:
        """One trial's work on its plan: cut and patch a copy of the base model, start its thresholds,
        tune them, score it; ``meter`` counts what it runs."""
        torch.manual_seed(seed)
        start = time.perf_counter()
        model, plan = self._reduced(plan, meter)
        mode = "static"
        if self.space.tune:
            mode = "dynamic"
            self._start(trial, model, plan, recipe, budget, meter)
            self._tune(trial, model, recipe, seed, batch_size, budget, meter)
        TrialRecord.write(trial, recipe=asdict(recipe))
        tune_seconds = time.perf_counter() - start
        return self._score(trial, model, plan, recipe, mode, batch_size, budget, meter, tune_seconds)

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
               budget: Budget, meter: ComputeMeter) -> None:
        """Set the thresholds where the recipe starts them (every pass over the calibration batch is
        counted). An unreachable aim prunes the trial."""
        self.hooks.on_phase("calibrate")
        passes = _count_forwards(model)
        try:
            if recipe.start == "plan":
                ltmp_core.set_mode(model, "dynamic")
            else:
                try:
                    if recipe.start == "solve":
                        ltmp_core.calibrate_to_flops(model, self.calibration, budget.aim)
                    else:
                        ltmp_core.calibrate(model, self.calibration)
                except ltmp_core.Unreachable as e:
                    self._infeasible(trial, list(plan.ops), str(e).removeprefix("flops: "))
        finally:
            meter.forward(passes() * len(self.calibration))
        TrialRecord.write(trial, calibrated_plan=ltmp_core.get_plan(model).to_dict())

    def _tune(self, trial: optuna.Trial, model: nn.Module, recipe: Recipe, seed: int, batch_size: int,
              budget: Budget, meter: ComputeMeter) -> None:
        """The recipe's tuning steps on the thresholds, each counted as it ends. The pruner sees the
        trial's intermediate scores."""
        c = self.config

        def on_step(step: int) -> None:
            meter.step(batch_size, teacher=c.distill)
            self.hooks.on_step(step, recipe.steps)
            # The pruner sees a trial only once it has tuned (never its calibrated start).
            if step % c.eval_every == 0 and step < recipe.steps and not self.multi:
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
               tune_seconds: float) -> float | tuple[float, float]:
        """Top-1 on the select split with tokens removed; the measured FLOPs ratio is the constraint."""
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
        record = TrialRecord(
            constraint=ratio - budget.target, accuracy=result.accuracy, flops_ratio=ratio, gmacs=result.macs / 1e9,
            feasible=ratio <= budget.target, kept_tokens=result.kept_tokens, eval_mode=mode, plan=final.to_dict(),
            time_tune_s=tune_seconds, time_eval_s=result.seconds,
        )
        TrialRecord.write(trial, **record.to_user_attrs())
        if self.recorder is not None:
            self.recorder.record(trial, model, mode, record.plan, result.kept_tokens, result.accuracy, ratio,
                                 budget.target)
        if self.multi:
            return result.accuracy, ratio
        if self.space.tune and recipe.steps:
            trial.report(result.accuracy, recipe.steps)
        return result.accuracy

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


def _count_forwards(model: nn.Module) -> Callable[[], int]:
    """Count the forward passes of ``model`` from now on: returns a function that tells how many."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))

    def count() -> int:
        handle.remove()
        return calls[0]

    return count
