"""``search train``: from an exported plan to a trained model in one safetensors file.

Two recipes:

- ``ltmp`` (default): LTMP's released recipe (its tools/train.py). Only the thresholds train, in soft
  mode, for one epoch: SGD without momentum or weight decay, a cosine schedule stepped per epoch (so one
  epoch runs at the full rate, as LTMP's does), label smoothing 0.1,
  ``CE + 10 * (r_flops - r_target)^2``. Learning rates 5e-3 for the merge thresholds and 5e-6 for the
  prune thresholds in LTMP's raw units (mean attention received, about 1/n); a plan whose prune
  thresholds are in relative units (importance times the token count) gets 5e-6 times the patch count,
  the same step in those units. Thresholds are clamped as LTMP does ([0, 1]; relative prune thresholds
  at 0 from below only). The soft forward is LTMP's released one (``--soft-form ltmp``, the default for this
  recipe where the plan is merge and prune in ToMe's order with raw mean-attention importance); other plans
  train through this project's soft forward (``--soft-form project``).
- ``full``: weights and thresholds train in soft mode with the same budget term, AdamW with warm-up and
  cosine decay (timm's ``create_optimizer_v2`` / ``create_scheduler_v2``), label smoothing, optional
  Mixup/CutMix (timm's ``Mixup``), distillation from the unreduced model (DeiT's soft distillation,
  alpha 0.5, temperature 1), gradient clipping, model EMA (timm's ``ModelEmaV3``), bf16 on CUDA.

Both aim the budget term at the plan's target less the study's margin (both recorded in the plan by its
trial, :class:`search.setup.budget.Budget`; ``--flops`` and ``--flops-margin`` override them): the images a
model is deployed on cost more or less than the training batches, as in the search.

Determinism: batch ``s`` of epoch ``e`` is fixed by ``(seed, e)``; every random draw of a step
(dropout, drop-path, Mixup, augmentation) is seeded from ``(seed, step, rank)``. So a run resumed from
its last checkpoint (``--resume``: weights, thresholds, optimizer, scheduler, step, the epoch's running
sums) ends with the same weights as one that never stopped, on the same machine; and ``torchrun
--nproc_per_node N`` with ``-b B`` (the global batch) trains on the same batches as one process with
``-b B`` (each rank takes a contiguous 1/N of each batch; the budget term sees the whole batch's
FLOPs ratio, averaged over the ranks with its gradient).
"""

from __future__ import annotations

import copy
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from ..setup.budget import COARSE_IMAGES, DEFAULT_MARGIN, RESOLVE_STEP, Budget
from ..setup.config import StudyConfig, TrainSettings
from ..setup.data import BUILTIN
from ..setup.evaluation import autocast, evaluate, unreduced_accuracy
from ..setup.workbench import Workbench, resolve_device
from .output import ARGS, LAST, MODEL_FILE, PLAN_FILE, SUMMARY, check_output, summary_csv, write_text, yaml_text

__all__ = ["train", "TrainResult", "epoch_steps", "train_one_epoch", "prepare"]

#: LTMP's prune-threshold learning rate relative to its merge one (5e-6 / 5e-3), raw units.
LTMP_PRUNE_LR_RATIO = 1e-3
#: DeiT's soft distillation: the weight of the teacher term and its temperature.
DISTILL_ALPHA, DISTILL_TAU = 0.5, 1.0


@dataclass
class TrainResult:
    out: Path
    epochs: int
    steps: int
    resumed_at: int
    history: list[dict[str, Any]]
    final: dict[str, Any]


# -- training ---------------------------------------------------------------------------------------


@contextmanager
def _distributed(device_name: str) -> Iterator[tuple[int, int, torch.device]]:
    """``(rank, world size, device)``: torch.distributed when started by torchrun (NCCL on GPUs, gloo on
    the CPU), else one process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1, resolve_device(device_name)
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world, device
    finally:
        dist.destroy_process_group()


def _seed_step(seed: int, step: int, rank: int) -> None:
    state = (seed * 1_000_003 + step) * 1009 + rank
    torch.manual_seed(state)
    random.seed(state)
    import numpy as np

    np.random.seed(state % 2**32)


def epoch_steps(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[Tensor]:
    """Positions of this rank's part of every batch of ``epoch`` (full batches only)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    local = batch_size // world
    return [order[s * batch_size + rank * local: s * batch_size + (rank + 1) * local] for s in range(n // batch_size)]


def _threshold_groups(model: nn.Module, s: TrainSettings, num_patches: int) -> list[dict[str, Any]]:
    """One optimizer group per threshold, at the recipe's rate in that threshold's units."""
    plan = ltmp_core.get_plan(model)
    groups = []
    for i, name, param in ltmp_core.thresholds(model):
        relative = plan.layers[i].importance_scale == "relative"
        if s.recipe == "ltmp":
            lr = s.lr if name == "merge_threshold" else s.lr * LTMP_PRUNE_LR_RATIO * (num_patches if relative else 1)
        else:
            lr = s.threshold_lr if name == "merge_threshold" or relative else s.threshold_lr / num_patches
        groups.append({"params": [param], "lr": lr, "weight_decay": 0.0, "name": f"blocks.{i}.{name}"})
    return groups


def _check_geometry(plan: ReductionPlan, config: StudyConfig, num_classes: int) -> None:
    """The plan fits the model's blocks and token grid (the model is built on the meta device: no memory,
    no weights)."""
    import timm

    kwargs = dict(config.model_kwargs, num_classes=num_classes)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    with torch.device("meta"):
        g = ltmp_core.ViTGeometry.from_model(timm.create_model(config.model, pretrained=False, **kwargs))
    if plan.geometry is not None and (plan.geometry.num_patches, plan.geometry.depth) != (g.num_patches, g.depth):
        raise LTMPError(
            f"plan: searched on {plan.geometry.depth} blocks and {plan.geometry.num_patches} patches "
            f"({plan.geometry.img_size[0]} px); {config.model} here has {g.depth} blocks and {g.num_patches} patches "
            f"({g.img_size[0]} px): train it on the model and size it was searched on")


def prepare(plan_path: str, config: StudyConfig, settings: TrainSettings, *, model_given: bool
            ) -> tuple[ReductionPlan, Budget]:
    """The plan and its budget, checked against the configuration before anything loads.

    The budget is the plan's own (its study's target and margin, recorded by the trial), unless
    ``--flops`` or ``--flops-margin`` say otherwise; a plan made by hand without one aims at the FLOPs
    ratio its budgets predict.
    """
    if settings.opt is not None:
        from timm.optim import list_optimizers

        if settings.opt not in list_optimizers():
            raise LTMPError(f"--opt: timm has no optimizer {settings.opt!r} (e.g. adamw, momentum, sgd, lamb)")
    plan = ltmp_core.load_plan(plan_path)
    if model_given and plan.model and config.model != plan.model:
        raise LTMPError(f"--model: the plan was searched on {plan.model}, not {config.model}; train it on its own "
                        "model (leave out --model)")
    budget = Budget.from_meta(plan.meta, target=settings.flops, margin=settings.flops_margin)
    if budget is None and plan.geometry is not None:
        budget = Budget(ltmp_core.plan_flops_ratio(plan), settings.flops_margin if settings.flops_margin is not None
                        else DEFAULT_MARGIN)
    if budget is None:
        raise LTMPError("--flops: the plan names no target FLOPs ratio; give --flops")
    return plan, budget


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "budget": 0.0, "ratio": 0.0, "n": 0}


@dataclass
class _Run:
    """One training run, set up: what its steps, epoch ends and checkpoints read and advance."""

    settings: TrainSettings
    bench: Workbench
    plan: ReductionPlan
    budget: Budget
    out: Path
    args: dict[str, Any]
    rank: int
    world: int
    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: Any
    scheduler: Any
    calibration: Tensor
    steps_per_epoch: int
    teacher: nn.Module | None = None
    ema: Any = None
    mixup: Any = None
    augment: Any = None
    base_top1: float | None = None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=_zero_sums)
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    #: The select split's evaluation at the end of the last epoch, and the step it was taken at: the final
    #: figures reuse it when no step ran since (the model has not changed).
    last_select: tuple[int, Any] | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.settings.epochs

    @property
    def batch(self) -> int:
        return self.bench.config.batch_size

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def evaluated(self, split: str) -> Any:
        """The model being trained (its moving average, if kept) on a split, tokens really removed."""
        module = self.ema.module if self.ema is not None else self.model
        return evaluate(module, self.bench.data.split_batches(split, self.batch), device=self.bench.device,
                        amp=self.bench.amp, mode="dynamic")


def _open(plan: ReductionPlan, budget: Budget, config: StudyConfig, s: TrainSettings, out: Path, args: dict[str, Any],
          rank: int, world: int, device: torch.device) -> _Run:
    """Data, base model, the plan's cut and patch, optimizer, schedule and extras of a run."""
    bench = Workbench.open(config, device=device,
                           before_weights=lambda data: _check_geometry(plan, config, data.num_classes))
    data = bench.data
    if s.train_images is not None:
        data.trial_images = s.train_images
        if hasattr(data, "tune_index"):
            data.tune_index = data.tune_index[: s.train_images]
    steps_per_epoch = _steps_per_epoch(data.tune_size(), config.batch_size, world, s)
    teacher = copy.deepcopy(bench.base).eval() if s.distill else None
    base_top1 = None
    if rank == 0:
        base_top1 = unreduced_accuracy(bench.base, data.split_batches("test", config.batch_size), device=device,
                                       amp=bench.amp)[0]
    # A plan that cuts width: the base model is cut as the plan's trial cut it, then trained narrower.
    model, plan = bench.reduced(plan, "static", fresh=False, teacher=teacher)
    calibration = data.calibration_batch(config.calib_images, 0)
    if any(getattr(layer, name) is None for layer in plan.layers for name in layer.needs()):
        ltmp_core.calibrate(model, calibration.to(device))  # budgets only: each layer starts at its budget
    ltmp_core.set_mode(model, "soft", soft_form=_soft_form(model, s))
    optimizer, scheduler = _optimizer(model, s, bench.geometry.num_patches, steps_per_epoch)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(s, bench, plan, budget, out, args, rank, world, model, net, optimizer, scheduler, calibration,
                steps_per_epoch, teacher=teacher, base_top1=base_top1, **_extras(model, s, config, data.num_classes))


def _soft_form(model: nn.Module, s: TrainSettings) -> str:
    """The soft form asked for; ``auto``: LTMP's released forward for its recipe where the plan is one that
    forward runs (merge and prune in ToMe's order, raw mean-attention importance), else this project's."""
    if s.soft_form != "auto":
        try:
            ltmp_core.set_mode(model, "soft", soft_form=s.soft_form)
        except LTMPError as e:
            raise LTMPError(f"--soft-form: {e}") from None
        return s.soft_form
    if s.recipe == "ltmp":
        try:
            ltmp_core.set_mode(model, "soft", soft_form="ltmp")
            return "ltmp"
        except LTMPError:
            pass
    return "project"


def _steps_per_epoch(n: int, batch: int, world: int, s: TrainSettings) -> int:
    if batch % world:
        raise LTMPError(f"-b: the global batch {batch} must divide among {world} processes")
    if n // batch == 0:
        raise LTMPError(f"-b: {batch} is more than the {n} training images")
    if (s.mixup or s.cutmix) and (batch // world) % 2:
        raise LTMPError("--mixup: needs an even batch per process")
    return n // batch


def _optimizer(model: nn.Module, s: TrainSettings, num_patches: int, steps_per_epoch: int) -> tuple[Any, Any]:
    """timm's optimizer and cosine schedule: the thresholds in groups of their own (no weight decay), the
    weights too for ``--recipe full``."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    trainable = ltmp_core.threshold_parameters(model)
    if not trainable:
        raise LTMPError("plan: no layer reduces tokens; there is nothing for the thresholds to learn")
    model.requires_grad_(s.recipe == "full")
    for p in trainable:
        p.requires_grad_(True)
    groups = _threshold_groups(model, s, num_patches)
    if s.recipe == "ltmp":
        optimizer = create_optimizer_v2(groups, opt="momentum", lr=s.lr, momentum=0.0, weight_decay=0.0)
    else:
        ids = {id(p) for p in trainable}
        decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids and p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids and p.ndim <= 1]
        optimizer = create_optimizer_v2(
            [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}, *groups],
            opt=s.opt, lr=s.lr, weight_decay=s.weight_decay)
    # LTMP's scheduler steps per epoch (its tools/train.py): its one epoch runs at the full rate. The full
    # recipe decays per update, as timm's train.py does.
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=s.epochs, min_lr=s.min_lr,
                                       warmup_epochs=s.warmup_epochs, warmup_lr=min(1e-6, s.lr),
                                       step_on_epochs=s.recipe == "ltmp", updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def _extras(model: nn.Module, s: TrainSettings, config: StudyConfig, num_classes: int) -> dict[str, Any]:
    """The model EMA, Mixup/CutMix and a folder's training transform, where asked for."""
    extras: dict[str, Any] = {}
    if s.model_ema:
        from timm.utils import ModelEmaV3

        extras["ema"] = ModelEmaV3(model, decay=s.model_ema_decay)
    if s.mixup or s.cutmix:
        from timm.data import Mixup

        extras["mixup"] = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, label_smoothing=s.smoothing,
                                num_classes=num_classes)
    if config.data not in BUILTIN:  # a folder: timm's training transform (built-in sets are tensors)
        from timm.data import create_transform, resolve_model_data_config

        g = ltmp_core.ViTGeometry.from_model(model)  # the input size is the unreduced model's
        dc = resolve_model_data_config(model)
        dc["input_size"] = (3, g.img_size[0], g.img_size[1])
        extras["augment"] = create_transform(**dc, is_training=True)
    return extras


def _restore(run: _Run, ckpt: dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, thresholds, optimizer, schedule, step, the epoch's sums."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"])
    run.step, run.history, run.sums = int(ckpt["step"]), list(ckpt["history"]), dict(ckpt["sums"])
    run.elapsed_before = float(ckpt.get("elapsed", 0.0))


def _save(run: _Run) -> None:
    """The resume checkpoint, written whole or not at all (rank 0 only)."""
    if run.rank != 0:
        return
    state = {"version": 1, "step": run.step, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "ema": None if run.ema is None else run.ema.state_dict(),
             "history": run.history, "sums": run.sums, "args": run.args, "elapsed": run.elapsed()}
    ltmp_core.write_atomic(run.out / LAST, lambda tmp: torch.save(state, tmp))


def _train_step(run: _Run, x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """One optimizer step on a batch: task loss (with distillation), the budget term, the update."""
    s, device = run.settings, run.bench.device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    soft_y = None
    if run.mixup is not None:
        x, soft_y = run.mixup(x, y)
    with autocast(device, run.bench.amp):
        logits = run.net(x).float()
        if soft_y is not None:
            task = torch.sum(-soft_y * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            task = F.cross_entropy(logits, y, label_smoothing=s.smoothing)
        if run.teacher is not None:
            with torch.no_grad():
                t_logits = run.teacher(x).float()
            kd = F.kl_div(F.log_softmax(logits / DISTILL_TAU, dim=-1), F.log_softmax(t_logits / DISTILL_TAU, dim=-1),
                          reduction="batchmean", log_target=True) * DISTILL_TAU ** 2
            task = (1 - DISTILL_ALPHA) * task + DISTILL_ALPHA * kd
    ratio = ltmp_core.expected_flops_ratio(run.model)
    if run.world > 1:  # the ratio of the whole batch, as one process would see it (with its gradient)
        from torch.distributed.nn.functional import all_reduce

        ratio = all_reduce(ratio) / run.world
    term = (run.budget.aim - ratio) ** 2
    loss = task + s.budget_weight * term
    if not torch.isfinite(loss):
        raise LTMPError(f"train: the loss is {loss.item()} at step {run.step + 1}; lower --lr")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if s.clip_grad is not None:
        from timm.utils import dispatch_clip_grad

        dispatch_clip_grad([p for p in run.model.parameters() if p.requires_grad], s.clip_grad)
    run.optimizer.step()
    if s.recipe == "ltmp":
        ltmp_core.clamp_thresholds(run.model)  # LTMP's rule: [0, 1]; relative prune thresholds at 0 only
    return task.item(), term.item(), ratio.item()


def train_one_epoch(run: _Run, on_step: Callable[[dict[str, Any]], None] | None = None) -> int:
    """The steps of the current epoch from the run's step on (a resumed run starts mid-epoch); returns
    the epoch (0-based)."""
    s = run.settings
    epoch, first = divmod(run.step, run.steps_per_epoch)
    positions = epoch_steps(run.bench.data.tune_size(), run.batch, s.seed, epoch, run.rank, run.world)[first:]
    run.net.train(s.recipe == "full")
    for x, y in run.bench.data.train_epoch(positions, s.seed, epoch, run.augment):
        _seed_step(s.seed, run.step, run.rank)
        task, term, ratio = _train_step(run, x, y)
        run.step += 1
        run.scheduler.step_update(num_updates=run.step)
        if run.ema is not None:
            run.ema.update(run.model, step=run.step)
        run.sums = {"loss": run.sums["loss"] + task, "budget": run.sums["budget"] + term,
                    "ratio": run.sums["ratio"] + ratio, "n": run.sums["n"] + 1}
        if on_step is not None:
            on_step({"step": run.step, "steps": run.total_steps, "epoch": epoch + 1, "epochs": s.epochs,
                     "loss": task, "budget": term, "flops_ratio": ratio, "lr": run.optimizer.param_groups[0]["lr"]})
        if run.step % run.steps_per_epoch and run.step % s.save_every == 0:
            _save(run)
    if run.step % run.steps_per_epoch:  # the epoch's data ran short (unreadable images): count it done
        run.step = (run.step // run.steps_per_epoch + 1) * run.steps_per_epoch
    return epoch


def _end_epoch(run: _Run, epoch: int, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Score the select split, write the summary and the checkpoint."""
    if run.rank == 0:
        ev = run.evaluated("select")
        run.last_select = (run.step, ev)
        k = max(1, run.sums["n"])
        row = {"epoch": epoch + 1, "train_loss": run.sums["loss"] / k, "budget_term": run.sums["budget"] / k,
               "train_flops_ratio": run.sums["ratio"] / k, "eval_top1": ev.accuracy, "eval_top5": ev.top5,
               "eval_flops_ratio": ev.macs / ltmp_core.unreduced_macs(run.bench.geometry),
               "lr": run.optimizer.param_groups[0]["lr"], "seconds": run.elapsed()}
        run.history.append(row)
        write_text(run.out / SUMMARY, summary_csv(run.history))
        if on_epoch is not None:
            on_epoch(row)
    run.sums = _zero_sums()
    run.scheduler.step(epoch + 1)  # a schedule in epochs moves here (after the row: its lr is the epoch's)
    _save(run)
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()


def train(
    plan_path: str,
    config: StudyConfig,
    settings: TrainSettings,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    model_given: bool = False,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``plan`` on ``config``'s model and data with ``settings``; write the results to ``out``.

    Only rank 0 writes. Returns the per-epoch history and the final figures (select and test splits).
    """
    s = settings.resolved()
    out = Path(out)
    plan, budget = prepare(plan_path, config, s, model_given=model_given)
    config_facts = {k: v for k, v in config.to_dict().items() if k in (
        "preset", "model", "model_kwargs", "data", "img_size", "holdout", "test_images", "checkpoint", "pretrained",
        "calib_images", "batch_size")}
    args = {**asdict(s), "plan": plan.to_dict(), "config": config_facts, "target": budget.target, "aim": budget.aim}
    with _distributed(config.device) as (rank, world, device):
        ckpt = check_output(out, resume, args)
        if ckpt is not None and ckpt.get("finished"):
            raise LTMPError(f"--resume: {out} holds a finished run ({MODEL_FILE}); nothing to resume")
        run = _open(plan, budget, config, s, out, args, rank, world, device)
        if ckpt is not None:
            _restore(run, ckpt)
        resumed_at = run.step
        if world > 1:  # every rank has checked OUT before rank 0 writes to it
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            out.mkdir(exist_ok=True)
            write_text(out / ARGS, yaml_text({**args, "world_size": world, "device": str(device),
                                             "weights": run.bench.info.get("source")}))
            ltmp_core.save_plan(run.plan, out / "plan_start.json")
        if on_start is not None:
            on_start({"epochs": s.epochs, "steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch,
                      "resumed_at": run.step, "rank": rank, "world": world, "device": str(device),
                      "target": budget.target, "aim": budget.aim, "weights": run.bench.info.get("source"),
                      "images": run.bench.data.tune_size()})
        while run.step < run.total_steps:
            _end_epoch(run, train_one_epoch(run, on_step), on_epoch)
        final = _finish(run) if rank == 0 else {}
        return TrainResult(out=out, epochs=s.epochs, steps=run.step, resumed_at=resumed_at, history=run.history,
                           final=final)


def _finish(run: _Run) -> dict[str, Any]:
    """Final figures on the select and test splits, the plan with the counts the thresholds keep, and the
    model file; then the resume checkpoint is removed (the run is whole).

    The budget term holds the soft-mode ratio at the aim, and hard mode may cost a little more. A model
    whose measured ratio on the select split is over the aim gets one shared shift of its thresholds
    (:func:`ltmp_core.calibrate_to_flops` on the calibration batch, the learned thresholds as offsets,
    searched from them outwards, on :data:`COARSE_IMAGES` of them first) that brings it back onto the aim;
    ``shifted_to_aim`` says so.
    """
    model = run.model if run.ema is None else run.ema.module
    aim, geometry = run.budget.aim, run.bench.geometry
    unreduced = ltmp_core.unreduced_macs(geometry)
    select = run.last_select[1] if run.last_select and run.last_select[0] == run.step else run.evaluated("select")
    shifted = select.macs / unreduced > aim
    if shifted:
        try:
            ltmp_core.calibrate_to_flops(model, run.calibration.to(run.bench.device), aim, near=RESOLVE_STEP,
                                         coarse=COARSE_IMAGES)
        except ltmp_core.Unreachable as e:
            raise LTMPError(f"train: the trained model is over the FLOPs target and cannot be brought back ({e})") \
                from None
        select = run.evaluated("select")
    test = run.evaluated("test")
    # The budgets static mode keeps: the shape the thresholds kept on the select split, scaled by one factor
    # so that the static model costs the aim (when whole tokens allow it; else the measured shape).
    trained = ltmp_core.measured_plan(ltmp_core.get_plan(model), select.kept_tokens, geometry)
    try:
        trained = ltmp_core.static_budgets(trained, aim)
    except LTMPError:
        pass
    s, plan, config = run.settings, run.plan, run.bench.config
    facts = {
        "recipe": s.recipe, "soft_form": ltmp_core.get_soft_form(model), "epochs": s.epochs, "steps": run.step,
        **run.budget.to_meta(),
        "shifted_to_aim": shifted, "select_top1": select.accuracy, "select_flops_ratio": select.macs / unreduced,
        "test_top1": test.accuracy, "test_top5": test.top5, "test_flops_ratio": test.macs / unreduced,
        "base_test_top1": run.base_top1, "search_top1": plan.meta.get("top1"), "config": run.args["config"],
        "model_kwargs": dict(config.model_kwargs), "weights": run.bench.info.get("source"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    facts["static_flops_ratio"] = ltmp_core.plan_flops_ratio(trained, static=True)
    trained = replace(trained, model=plan.model or config.model,
                      meta={**plan.meta, **run.budget.to_meta(), "trained": facts})
    ltmp_core.save_trained(model, run.out / MODEL_FILE, plan=trained, facts=facts)
    ltmp_core.save_plan(trained, run.out / PLAN_FILE)
    (run.out / LAST).unlink(missing_ok=True)
    return facts
