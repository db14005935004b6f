"""One trial: sample a plan, patch a copy of the base model, calibrate, tune, score on held-out images."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import optuna
import torch
import torch.nn as nn

import ltmp_core
from ltmp_core import ViTGeometry
from spaces import Infeasible, get_space, suggest

from .config import StudyConfig
from .data import StudyData
from .finetune import NonFiniteLoss, evaluate, tune_thresholds

__all__ = ["Objective", "TrialHooks", "METRIC_NAME"]

METRIC_NAME = "top-1 accuracy"


@dataclass
class TrialHooks:
    """Progress callbacks (the command line draws bars with them)."""

    on_trial_start: Callable[[int], None] = lambda number: None
    on_step: Callable[[int, int], None] = lambda step, steps: None


class Objective:
    """Callable for ``study.optimize``: returns held-out top-1 accuracy, sets the FLOPs constraint.

    The base model is loaded once by the caller; each trial works on a deep copy.
    """

    def __init__(
        self,
        config: StudyConfig,
        base: nn.Module,
        data: StudyData,
        *,
        device: torch.device,
        amp: bool,
        hooks: TrialHooks | None = None,
        recorder: Any = None,
    ) -> None:
        self.config = config
        self.recorder = recorder  # search.dashboard.TrialRecorder: notes and pictures for the dashboard
        self.device = device
        self.amp = amp
        self.base = base.to(device).eval()
        self.data = data
        self.geometry = ViTGeometry.from_model(base)
        self.unreduced_macs = ltmp_core.unreduced_macs(self.geometry)
        self.space = get_space(config.space)
        self.hooks = hooks or TrialHooks()
        self.calibration = data.calibration_batch(config.calib_images).to(device)
        self._reported: set[tuple[int, int]] = set()

    def __call__(self, trial: optuna.Trial) -> float:
        c = self.config
        self.hooks.on_trial_start(trial.number)
        seed = c.seed + trial.number
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("device", str(self.device))
        aim = c.flops * (1.0 - c.flops_margin)
        try:
            plan = suggest(c.space, trial, self.geometry, aim, ops=c.ops, importance=c.importance)
        except Infeasible as e:
            trial.set_user_attr("ops", e.ops)
            trial.set_user_attr("pruned_reason", str(e))
            raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("ops", list(plan.ops))
        plan = replace(plan, model=c.model).with_layers(tau=[c.tau] * plan.depth)
        trial.set_user_attr("predicted_flops_ratio", ltmp_core.plan_flops_ratio(plan))
        try:
            return self._run(trial, plan, seed, c.batch_size)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            half = max(1, c.batch_size // 2)
            trial.set_user_attr("oom_retry_batch_size", half)
            try:
                return self._run(trial, plan, seed, half)
            except torch.cuda.OutOfMemoryError:
                trial.set_user_attr("fail_reason", f"CUDA out of memory at batch size {c.batch_size} and again at {half}")
                raise

    def _run(self, trial: optuna.Trial, plan: ltmp_core.ReductionPlan, seed: int, batch_size: int) -> float:
        c = self.config
        torch.manual_seed(seed)
        model = copy.deepcopy(self.base)
        ltmp_core.apply_plan(model, plan, mode="static")
        start = time.perf_counter()
        mode = "static"
        if self.space.tune:
            mode = "dynamic"
            ltmp_core.calibrate(model, self.calibration)
            self._report(trial, model, 0, batch_size)
            steps = c.trial_steps

            def on_step(step: int) -> None:
                self.hooks.on_step(step, steps)
                if step % c.eval_every == 0 and step < steps:
                    self._report(trial, model, step, batch_size)

            try:
                tuned = tune_thresholds(
                    model, self.data.train_batches(batch_size, seed), steps=steps, lr=c.lr,
                    budget=self.space.budget if c.budget == "space" else c.budget,
                    budget_weight=c.budget_weight, target=c.flops * (1.0 - c.flops_margin),
                    teacher=self.base if c.distill else None, device=self.device, amp=self.amp,
                    on_step=on_step,
                )
            except NonFiniteLoss as e:
                trial.set_user_attr("fail_reason", str(e))
                raise
            trial.set_user_attr("tune_task_loss", tuned.task_loss)
            trial.set_user_attr("tune_budget_loss", tuned.budget_loss)
        tune_seconds = time.perf_counter() - start

        result = evaluate(model, self.data.holdout_batches(batch_size), device=self.device, amp=self.amp, mode=mode)
        ratio = result.macs / self.unreduced_macs
        trial.set_constraint("flops", ratio - c.flops)
        attrs = {
            "constraint": ratio - c.flops,  # mirrored: optuna-dashboard 0.21 reads user attributes
            "flops_ratio": ratio,
            "gmacs": result.macs / 1e9,
            "feasible": ratio <= c.flops,
            "kept_tokens": result.kept_tokens,
            "eval_mode": mode,
            "plan": ltmp_core.get_plan(model).to_dict(),
            "time_tune_s": tune_seconds,
            "time_eval_s": result.seconds,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if self.recorder is not None:
            self.recorder.record(trial, model, mode, attrs["plan"], result.kept_tokens, result.accuracy, ratio, c.flops)
        if self.space.tune:
            trial.report(result.accuracy, c.trial_steps)
        return result.accuracy

    def _report(self, trial: optuna.Trial, model: nn.Module, step: int, batch_size: int) -> None:
        if (trial.number, step) in self._reported:  # a retry after running out of memory
            return
        self._reported.add((trial.number, step))
        quick = evaluate(model, self.data.holdout_batches(batch_size, limit=self.config.eval_images),
                         device=self.device, amp=self.amp)
        trial.report(quick.accuracy, step)
        if trial.should_prune():
            trial.set_user_attr("pruned_reason", f"stopped by the pruner: accuracy {quick.accuracy:.3f} at step {step}")
            raise optuna.TrialPruned()

    @torch.no_grad()
    def base_accuracy(self) -> float:
        """Held-out accuracy of the unreduced base model."""
        correct = seen = 0
        for x, y in self.data.holdout_batches(self.config.batch_size):
            correct += int((self.base(x.to(self.device)).argmax(-1) == y.to(self.device)).sum())
            seen += len(y)
        return correct / max(1, seen)
