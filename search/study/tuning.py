"""Threshold tuning of a patched model (a trial's brief fine-tuning).

Only the thresholds learn (two scalars per block at most); the model's weights stay frozen, so no
weight gradient is ever computed. The loss is cross-entropy on the labels, or with ``distill`` the
KL divergence to the unreduced model's predictions, plus the budget term: per layer (each layer's
kept fraction against its own budget) or global (LTMP's FLOPs ratio against the target).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import ltmp_core
from ltmp_core import LTMPError

from ..setup.evaluation import autocast

__all__ = ["Recipe", "TuneResult", "NonFiniteLoss", "tune_thresholds"]


@dataclass(frozen=True)
class Recipe:
    """How one trial trains its thresholds (the model's weights stay frozen).

    Two recipes are named in the docs: this project's (the defaults: a calibrated start, Adam in units
    of each threshold's score spread, a strong budget term) and LTMP's released one (``spaces.LTMP_TUNING``:
    thresholds start at 0.9 and 0, plain SGD at 5e-3 and 5e-6 on the raw values, clamped to [0, 1],
    label smoothing 0.1, ``10 * (target - r_flops)^2``). A space may override any field for its
    trials through ``plan.meta["tuning"]``.

    Attributes:
        steps: Tuning steps.
        optimizer: ``adam`` (each threshold's learning rate is ``lr`` times its calibrated score
            spread, :func:`ltmp_core.threshold_scales`) or ``sgd`` (plain SGD on the raw values, no
            momentum or weight decay, constant rate: LTMP's).
        lr: Learning rate of the merge thresholds (and of the prune thresholds without ``lr_prune``).
        lr_prune: Learning rate of the prune thresholds, if different.
        budget: ``layer`` (every layer against its own budget) or ``global`` (LTMP's FLOPs term).
        budget_weight: Weight of the budget term.
        smoothing: Label smoothing of the cross-entropy.
        clamp: Clamp the thresholds to [0, 1] after every step (LTMP).
        start: ``solve`` (one shift of every merge threshold, or prune threshold, solved for the FLOPs
            aim on the calibration batch), ``calibrate`` (every layer starts at its budget) or ``plan``
            (the plan's thresholds).
        tau: Temperature of the soft threshold masks (LTMP's ``tau``), for every layer.
        soft_form: What the soft (training) forward computes (:data:`ltmp_core.SOFT_FORMS`):
            ``project`` (this project's) or ``ltmp`` (LTMP's released training forward, for plans of
            merge and prune in ToMe's order with raw mean-attention importance).
    """

    steps: int = 40
    optimizer: str = "adam"
    lr: float = 0.05
    lr_prune: float | None = None
    budget: str = "layer"
    budget_weight: float = 1000.0
    smoothing: float = 0.0
    clamp: bool = False
    start: str = "calibrate"
    tau: float = 0.1
    soft_form: str = "project"

    def __post_init__(self) -> None:
        for name, table in (("optimizer", ("adam", "sgd")), ("budget", ("layer", "global")),
                            ("start", ("solve", "calibrate", "plan")), ("soft_form", ltmp_core.SOFT_FORMS)):
            if getattr(self, name) not in table:
                raise LTMPError(f"tuning.{name}: expected one of {', '.join(table)}, got {getattr(self, name)!r}")

    def updated(self, overrides: dict[str, Any] | None) -> "Recipe":
        """This recipe with a space's overrides (``plan.meta["tuning"]``); unknown keys are an error."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise LTMPError(f"tuning.{unknown[0]}: not a tuning setting")
        return replace(self, **overrides)


@dataclass
class TuneResult:
    """The last step's task loss (cross-entropy or KL) and budget term."""

    task_loss: float
    budget_loss: float


class NonFiniteLoss(RuntimeError):
    """The tuning loss became NaN or infinite (a fault of the trial, not of the configuration)."""


def tune_thresholds(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    recipe: Recipe,
    target: float,
    teacher: nn.Module | None = None,
    device: torch.device,
    amp: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TuneResult:
    """Train the thresholds of a patched model in soft mode for ``recipe.steps`` steps.

    Args:
        model: A patched model whose thresholds are set (calibrated or from the plan); its weights are
            frozen here.
        batches: Endless ``(images, labels)`` tuning batches.
        recipe: The optimiser, learning rates, loss and budget term.
        target: The FLOPs ratio the global budget term aims at.
        teacher: The unreduced model, for distillation; ``None`` uses the labels.
        on_step: Called after every step with the step number (1-based); may raise to stop.
    """
    thresholds = ltmp_core.threshold_parameters(model)
    model.requires_grad_(False)
    for p in thresholds:
        p.requires_grad_(True)
    task_v = budget_v = 0.0
    if not thresholds or recipe.steps == 0:
        return TuneResult(0.0, 0.0)
    rates = [recipe.lr if name == "merge_threshold" or recipe.lr_prune is None else recipe.lr_prune
             for name in ltmp_core.threshold_names(model)]
    if recipe.optimizer == "adam":
        # Each threshold moves in units of its own score spread (Adam steps are about lr in size).
        scales = ltmp_core.threshold_scales(model)
        opt: torch.optim.Optimizer = torch.optim.Adam(
            [{"params": [p], "lr": r * s} for p, r, s in zip(thresholds, rates, scales)])
    else:
        opt = torch.optim.SGD([{"params": [p], "lr": r} for p, r in zip(thresholds, rates)], momentum=0.0)
    ltmp_core.set_mode(model, "soft", soft_form=recipe.soft_form)
    model.eval()  # dropout and drop-path off: the thresholds learn for the deployed model
    for step in range(1, recipe.steps + 1):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    soft_targets = teacher(x).float().softmax(dim=-1)
                task = F.kl_div(logits.float().log_softmax(dim=-1), soft_targets, reduction="batchmean")
            else:
                task = F.cross_entropy(logits.float(), y, label_smoothing=recipe.smoothing)
        if recipe.budget == "global":
            term = ltmp_core.flops_budget_loss(model, target)
        else:
            term = ltmp_core.layer_budget_loss(model)
        loss = task + recipe.budget_weight * term
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"tuning loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if recipe.clamp:
            with torch.no_grad():
                for p in thresholds:
                    p.clamp_(0.0, 1.0)
        task_v, budget_v = task.item(), term.item()
        if on_step is not None:
            on_step(step)
    for p in thresholds:
        p.requires_grad_(False)
    return TuneResult(task_v, budget_v)


