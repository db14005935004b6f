"""Threshold tuning and evaluation of a patched model.

Only the thresholds learn (two scalars per block at most); the model's weights stay frozen, so no
weight gradient is ever computed. The loss is cross-entropy on the labels, or with ``distill`` the
KL divergence to the unreduced model's predictions, plus the budget term: per layer (each layer's
kept fraction against its own budget) or global (LTMP's FLOPs ratio against the target).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import ltmp_core
from ltmp_core import LTMPError

__all__ = ["TuneResult", "tune_thresholds", "evaluate", "Evaluation", "autocast"]


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` when ``amp``, else nothing."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
    steps: int,
    lr: float,
    budget: str,
    budget_weight: float,
    target: float,
    teacher: nn.Module | None = None,
    device: torch.device,
    amp: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TuneResult:
    """Train the thresholds of a patched model in soft mode for ``steps`` steps.

    Args:
        model: A patched model whose thresholds are set (calibrated); its weights are frozen here.
        batches: Endless ``(images, labels)`` tuning batches.
        budget: ``"layer"`` or ``"global"``.
        teacher: The unreduced model, for distillation; ``None`` uses the labels.
        on_step: Called after every step with the step number (1-based); may raise to stop.
    """
    thresholds = ltmp_core.threshold_parameters(model)
    model.requires_grad_(False)
    for p in thresholds:
        p.requires_grad_(True)
    task_v = budget_v = 0.0
    if not thresholds or steps == 0:
        return TuneResult(0.0, 0.0)
    # Each threshold moves in units of its own score spread (Adam steps are about lr in size).
    scales = ltmp_core.threshold_scales(model)
    opt = torch.optim.Adam([{"params": [p], "lr": lr * s} for p, s in zip(thresholds, scales)])
    ltmp_core.set_mode(model, "soft")
    model.eval()  # dropout and drop-path off: the thresholds learn for the deployed model
    for step in range(1, steps + 1):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    soft_targets = teacher(x).float().softmax(dim=-1)
                task = F.kl_div(logits.float().log_softmax(dim=-1), soft_targets, reduction="batchmean")
            else:
                task = F.cross_entropy(logits.float(), y)
        if budget == "global":
            term = ltmp_core.flops_budget_loss(model, target)
        else:
            term = ltmp_core.layer_budget_loss(model)
        loss = task + budget_weight * term
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"tuning loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        task_v, budget_v = task.item(), term.item()
        if on_step is not None:
            on_step(step)
    for p in thresholds:
        p.requires_grad_(False)
    return TuneResult(task_v, budget_v)


@dataclass
class Evaluation:
    """Held-out figures of a patched model in hard mode."""

    accuracy: float
    top5: float
    images: int
    macs: float  # mean per image
    kept_tokens: list[float]  # mean tokens after each block, prefix included
    seconds: float


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    amp: bool = False,
    mode: str = "dynamic",
    runner: Callable[[Tensor], Tensor] | None = None,
) -> Evaluation:
    """Top-1 accuracy and mean MACs per image with tokens really removed (``mode`` dynamic or static).

    The model's mode and train flag are restored afterwards, so this can run in the middle of tuning.
    ``runner`` calls the model (e.g. a ``torch.compile`` of it); token counts are read from ``model``.
    """
    start = time.perf_counter()
    previous, was_training = ltmp_core.get_mode(model), model.training
    ltmp_core.set_mode(model, mode)
    model.eval()
    correct, correct5, seen, macs = 0, 0, 0, 0.0
    kept: Tensor | None = None
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = (runner or model)(x)
            correct += int((logits.argmax(dim=-1) == y).sum())
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct5 += int((top == y.unsqueeze(-1)).any(dim=-1).sum())
            seen += len(y)
            macs += float(ltmp_core.image_macs(model).sum())
            counts = ltmp_core.token_counts(model)[1:].double().sum(dim=1).cpu()
            kept = counts if kept is None else kept + counts
    finally:
        ltmp_core.set_mode(model, previous)
        model.train(was_training)
    if seen == 0:
        raise LTMPError("holdout: no images to evaluate")
    return Evaluation(
        accuracy=correct / seen,
        top5=correct5 / seen,
        images=seen,
        macs=macs / seen,
        kept_tokens=[float(k) / seen for k in kept],
        seconds=time.perf_counter() - start,
    )
