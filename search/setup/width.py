"""A plan's width cut, done the same way in a trial, in ``search validate`` and in ``search train``.

Which heads and MLP units a block keeps depends on the weights and on the images that rank them, so
a plan that cuts width says in ``meta["width"]`` how its cut was made (:class:`WidthCut`): the
criterion, the calibration batch (its size and seed) and the short recovery after it. Replaying that
on the same base model and data gives the same narrower model, so ``search validate plan.json`` scores
what the trial scored and ``search train`` starts from it. A plan without that record (made by hand)
is cut with the study's settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from .config import StudyConfig
from .data import StudyData
from .evaluation import autocast

__all__ = ["WidthCut", "cut_width", "recover", "width_cut_for"]


@dataclass(frozen=True)
class WidthCut:
    """How a plan's width was cut (``plan.meta["width"]``).

    Attributes:
        importance: :data:`ltmp_core.WIDTH_IMPORTANCE`: how heads and hidden units are ranked.
        calib_images: Size of the calibration batch of the Taylor criterion (drawn from the tune split).
        seed: Seed of that draw (and of the recovery's batches).
        recover_steps: Steps of recovery after the cut (0: none): the norms and biases that remain
            learn to give the unreduced model's predictions again (KL divergence on tune batches,
            AdamW); every other weight stays as torch-pruning left it.
        recover_lr: Learning rate of the recovery.
        recover_batch: Images per recovery step.
    """

    importance: str = "taylor"
    calib_images: int = 256
    seed: int = 0
    recover_steps: int = 0
    recover_lr: float = 1e-3
    recover_batch: int = 64

    @classmethod
    def of(cls, plan: ReductionPlan, default: "WidthCut") -> "WidthCut":
        """The cut recorded in ``plan`` (``default`` where it records nothing)."""
        recorded = plan.meta.get("width")
        if recorded is None:
            return default
        if not isinstance(recorded, Mapping):
            raise LTMPError(f"meta.width: expected an object, got {type(recorded).__name__}")
        unknown = sorted(set(recorded) - {f.name for f in fields(cls)})
        if unknown:
            raise LTMPError(f"meta.width.{unknown[0]}: not a width setting")
        return cls(**{**asdict(default), **recorded})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def width_cut_for(config: StudyConfig) -> WidthCut:
    """How a study cuts the width of a plan that asks for it: on its trials' calibration batch."""
    return WidthCut(importance=config.width_importance, calib_images=config.calib_images, seed=config.seed,
                    recover_steps=config.width_recovery)


def recover(model: nn.Module, teacher: nn.Module, data: StudyData, cut: WidthCut, *, device: torch.device,
            amp: bool = False) -> None:
    """``cut.recover_steps`` steps on the norms and biases of a width-cut model, towards ``teacher``."""
    params = [p for p in model.parameters() if p.ndim <= 1]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cut.recover_lr, weight_decay=0.0)
    batches = data.train_batches(cut.recover_batch, cut.seed)
    was_training = model.training
    model.eval()  # the deployed model's behaviour: no dropout
    try:
        for _ in range(cut.recover_steps):
            x, _ = next(batches)
            x = x.to(device, non_blocking=True)
            with autocast(device, amp):
                with torch.no_grad():
                    target = teacher(x).float().log_softmax(dim=-1)
                out = model(x).float().log_softmax(dim=-1)
            loss = F.kl_div(out, target, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def cut_width(model: nn.Module, plan: ReductionPlan, data: StudyData, cut: WidthCut, *, device: torch.device,
              amp: bool = False, teacher: nn.Module | None = None) -> ReductionPlan:
    """Cut ``model`` (unpatched, on ``device``) to the plan's widths as ``cut`` says; the plan with the
    cut recorded in ``meta["width"]`` (unchanged for a plan that keeps every block's width).

    ``teacher``: the unreduced model, for the recovery (default: a copy of ``model`` taken first). A
    model that has the plan's widths already (a trained model's file was loaded into it) is left as it is.
    """
    if not plan.cuts_width or ltmp_core.block_widths(model) == plan.widths(ltmp_core.ViTGeometry.from_model(model)):
        return plan
    if cut.recover_steps and teacher is None:
        import copy

        teacher = copy.deepcopy(model).eval()
    images = data.calibration_batch(cut.calib_images, cut.seed).to(device) if cut.importance == "taylor" else None
    with torch.random.fork_rng(devices=[]):  # the random criterion draws the same in every replay
        torch.manual_seed(cut.seed)
        ltmp_core.prune_width(model, plan, images, importance=cut.importance)
    if cut.recover_steps:
        recover(model, teacher, data, cut, device=device, amp=amp)
    return replace(plan, meta={**plan.meta, "width": cut.to_dict()})
