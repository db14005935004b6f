"""``search train``: from an exported plan to a trained model in one safetensors file.

Two recipes:

- ``ltmp`` (default): LTMP's released recipe (its tools/train.py). Only the thresholds train, in soft
  mode, for one epoch: SGD without momentum or weight decay, a cosine schedule, label smoothing 0.1,
  ``CE + 10 * (r_flops - r_target)^2``. Learning rates 5e-3 for the merge thresholds and 5e-6 for the
  prune thresholds in LTMP's raw units (mean attention received, about 1/n); a plan whose prune
  thresholds are in relative units (importance times the token count) gets 5e-6 times the patch count,
  the same step in those units. Thresholds are clamped as LTMP does ([0, 1]; relative prune thresholds
  at 0 from below only).
- ``full``: weights and thresholds train in soft mode with the same budget term, AdamW with warm-up and
  cosine decay (timm's ``create_optimizer_v2`` / ``create_scheduler_v2``), label smoothing, optional
  Mixup/CutMix (timm's ``Mixup``), distillation from the unreduced model (DeiT's soft distillation,
  alpha 0.5, temperature 1), gradient clipping, model EMA (timm's ``ModelEmaV3``), bf16 on CUDA.

Both aim the budget term at the plan's target less the study's margin (``--flops-margin``, 2%): the
images a model is deployed on cost more or less than the training batches, as in the search.

Determinism: batch ``s`` of epoch ``e`` is fixed by ``(seed, e)``; every random draw of a step
(dropout, drop-path, Mixup, augmentation) is seeded from ``(seed, step, rank)``. So a run resumed from
its last checkpoint (``--resume``: weights, thresholds, optimizer, scheduler, step, the epoch's running
sums) ends with the same weights as one that never stopped, on the same machine; and ``torchrun
--nproc_per_node N`` with ``-b B`` (the global batch) trains on the same batches as one process with
``-b B`` (each rank takes a contiguous 1/N of each batch; the budget term sees the whole batch's
FLOPs ratio, averaged over the ranks with its gradient).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from .config import StudyConfig, TrainSettings, train_flag as _flag
from .data import BUILTIN, StudyData
from .finetune import autocast, evaluate, unreduced_accuracy
from .models import load_base_model
from .prepare import open_data, resolve_device
from .width import WidthCut, cut_width, width_cut_for

__all__ = ["train", "TrainResult", "check_output", "LAST", "MODEL_FILE"]

#: Files a run writes in its output folder.
LAST, MODEL_FILE, PLAN_FILE, SUMMARY, ARGS = "last.pth", "model.safetensors", "plan.json", "summary.csv", "args.yaml"
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


# -- the output folder -----------------------------------------------------------------------------


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


def _write_text(path: Path, text: str) -> None:
    ltmp_core.write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def check_output(out: Path, resume: bool, args: dict[str, Any]) -> dict[str, Any] | None:
    """Check the output folder before anything is written; the checkpoint to resume from, if any.

    A folder that holds another run needs ``--resume``; ``--resume`` needs a checkpoint there written
    with the same settings (those that change what is trained).
    """
    if out.exists() and not out.is_dir():
        raise LTMPError(f"-o: {out} is a file, not a folder")
    last = out / LAST
    held = [name for name in (LAST, MODEL_FILE, ARGS) if (out / name).exists()]
    if not resume:
        if held:
            raise LTMPError(f"-o: {out} holds another run ({held[0]}); pass --resume to continue it, or choose "
                            "another folder")
        if not out.parent.is_dir():
            raise LTMPError(f"-o: no folder {out.parent} (create it first)")
        return None
    if not last.is_file():
        if (out / MODEL_FILE).is_file():
            return {"finished": True}
        raise LTMPError(f"--resume: {out} holds no checkpoint ({LAST}); start a new run without --resume")
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LTMPError(f"--resume: cannot read {last} ({str(e).strip().splitlines()[0][:160] if str(e) else e})") \
            from None
    saved = ckpt.get("args", {})
    keys = [f.name for f in fields(TrainSettings) if f.metadata["result"]] + ["plan", "config"]
    for key in keys:
        if key in saved and json.dumps(saved[key], sort_keys=True, default=str) != json.dumps(
                args.get(key), sort_keys=True, default=str):
            where = _flag(key) if key in {f.name for f in fields(TrainSettings)} else key
            raise LTMPError(f"--resume: {out} was trained with {where} = {saved[key]!r}, not {args.get(key)!r}")
    return ckpt


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
    layers = [i for i, block in enumerate(model.blocks) for name in ltmp_core.THRESHOLDS if name in block._parameters]
    for i, name, param in zip(layers, ltmp_core.threshold_names(model), ltmp_core.threshold_parameters(model)):
        relative = plan.layers[i].importance_scale == "relative"
        if s.recipe == "ltmp":
            lr = s.lr if name == "merge_threshold" else s.lr * LTMP_PRUNE_LR_RATIO * (num_patches if relative else 1)
        else:
            lr = s.threshold_lr if name == "merge_threshold" or relative else s.threshold_lr / num_patches
        groups.append({"params": [param], "lr": lr, "weight_decay": 0.0, "name": f"blocks.{i}.{name}"})
    return groups


def _clamp(model: nn.Module) -> None:
    """LTMP clamps its thresholds to [0, 1] after every step; relative prune thresholds are not bounded
    by 1 (1 is an average token), so only their lower end is clamped."""
    plan = ltmp_core.get_plan(model)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for name in ltmp_core.THRESHOLDS:
                p = block._parameters.get(name)
                if p is not None:
                    relative = name == "prune_threshold" and plan.layers[i].importance_scale == "relative"
                    p.clamp_(0.0, None if relative else 1.0)


def _summary_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


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
            ) -> tuple[ReductionPlan, float]:
    """The plan and its target, checked against the configuration before anything loads."""
    if settings.opt is not None:
        from timm.optim import list_optimizers

        if settings.opt not in list_optimizers():
            raise LTMPError(f"--opt: timm has no optimizer {settings.opt!r} (e.g. adamw, momentum, sgd, lamb)")
    plan = ltmp_core.load_plan(plan_path)
    if model_given and plan.model and config.model != plan.model:
        raise LTMPError(f"--model: the plan was searched on {plan.model}, not {config.model}; train it on its own "
                        "model (leave out --model)")
    target = settings.flops if settings.flops is not None else plan.meta.get("target_flops_ratio")
    if target is None:
        target = ltmp_core.plan_flops_ratio(plan) if plan.geometry is not None else None
    if target is None:
        raise LTMPError("--flops: the plan names no target FLOPs ratio; give --flops")
    return plan, float(target)


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
    plan, target = prepare(plan_path, config, s, model_given=model_given)
    aim = target * (1.0 - s.flops_margin)
    config_facts = {k: v for k, v in config.to_dict().items() if k in (
        "preset", "model", "model_kwargs", "data", "img_size", "holdout", "test_images", "checkpoint", "pretrained",
        "calib_images", "batch_size")}
    args = {**asdict(s), "plan": plan.to_dict(), "config": config_facts, "target": target, "aim": aim}
    with _distributed(config.device) as (rank, world, device):
        ckpt = check_output(out, resume, args)
        if ckpt is not None and ckpt.get("finished"):
            raise LTMPError(f"--resume: {out} holds a finished run ({MODEL_FILE}); nothing to resume")
        amp = config.amp if config.amp is not None else device.type == "cuda"
        data = open_data(config, device)
        if s.train_images is not None:
            data.trial_images = s.train_images
            if hasattr(data, "tune_index"):
                data.tune_index = data.tune_index[: s.train_images]
        _check_geometry(plan, config, data.num_classes)  # before any weights load (or train)
        base, info = load_base_model(
            config.model, data, img_size=config.img_size, model_kwargs=config.model_kwargs,
            pretrained=config.pretrained, checkpoint=config.checkpoint, base_epochs=config.base_epochs)
        geometry = ltmp_core.ViTGeometry.from_model(base)
        batch = config.batch_size
        if batch % world:
            raise LTMPError(f"-b: the global batch {batch} must divide among {world} processes")
        n = data.tune_size()
        steps_per_epoch = n // batch
        if steps_per_epoch == 0:
            raise LTMPError(f"-b: {batch} is more than the {n} training images")
        if s.mixup or s.cutmix:
            if (batch // world) % 2:
                raise LTMPError("--mixup: needs an even batch per process")
        total_steps = steps_per_epoch * s.epochs

        teacher = None
        if s.distill:
            import copy

            teacher = copy.deepcopy(base).to(device).eval()
        base.to(device)
        base_top1 = None
        if rank == 0:
            base_top1 = unreduced_accuracy(base, data.split_batches("test", batch), device=device, amp=amp)[0]
        model = base
        # A plan that cuts width: the base model is cut as the plan's trial cut it, then trained narrower.
        plan = cut_width(model, plan, data, WidthCut.of(plan, width_cut_for(config)), device=device, amp=amp,
                         teacher=teacher)
        ltmp_core.apply_plan(model, plan, mode="static")
        missing = any(getattr(layer, name) is None for layer in plan.layers for name in layer.needs())
        calibration = data.calibration_batch(config.calib_images, 0)
        model.to(device)
        if missing:  # a plan with budgets only: thresholds placed so each layer keeps its budget
            ltmp_core.calibrate(model, calibration.to(device))
        ltmp_core.set_mode(model, "soft")
        trainable = ltmp_core.threshold_parameters(model)
        if not trainable:
            raise LTMPError("plan: no layer reduces tokens; there is nothing for the thresholds to learn")
        model.requires_grad_(s.recipe == "full")
        for p in trainable:
            p.requires_grad_(True)

        groups = _threshold_groups(model, s, geometry.num_patches)
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        if s.recipe == "ltmp":
            optimizer = create_optimizer_v2(groups, opt="momentum", lr=s.lr, momentum=0.0, weight_decay=0.0)
        else:
            ids = {id(p) for p in trainable}
            decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids and p.ndim > 1]
            no_decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids and p.ndim <= 1]
            optimizer = create_optimizer_v2(
                [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}, *groups],
                opt=s.opt, lr=s.lr, weight_decay=s.weight_decay)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=s.epochs, min_lr=s.min_lr,
                                           warmup_epochs=s.warmup_epochs, warmup_lr=min(1e-6, s.lr),
                                           step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        ema = None
        if s.model_ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=s.model_ema_decay)
        mixup = None
        if s.mixup or s.cutmix:
            from timm.data import Mixup

            mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, label_smoothing=s.smoothing,
                          num_classes=data.num_classes)
        augment = None
        if config.data not in BUILTIN:  # a folder: timm's training transform (built-in sets are tensors)
            from timm.data import create_transform, resolve_model_data_config

            dc = resolve_model_data_config(model)
            dc["input_size"] = (3, geometry.img_size[0], geometry.img_size[1])
            augment = create_transform(**dc, is_training=True)

        step, history, sums = 0, [], {"loss": 0.0, "budget": 0.0, "ratio": 0.0, "n": 0}
        elapsed_before = 0.0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            step, history, sums = int(ckpt["step"]), list(ckpt["history"]), dict(ckpt["sums"])
            elapsed_before = float(ckpt.get("elapsed", 0.0))
        resumed_at = step
        net: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1:  # every rank has checked OUT before rank 0 writes to it
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            out.mkdir(exist_ok=True)
            _write_text(out / ARGS, _yaml({**args, "world_size": world, "device": str(device),
                                             "weights": info.get("source")}))
            ltmp_core.save_plan(plan, out / "plan_start.json")
        if on_start is not None:
            on_start({"epochs": s.epochs, "steps": total_steps, "steps_per_epoch": steps_per_epoch, "resumed_at": step,
                      "rank": rank, "world": world, "device": str(device), "target": target, "aim": aim,
                      "weights": info.get("source"), "images": n})
        started = time.perf_counter()

        def save(step: int) -> None:
            if rank != 0:
                return
            state = {"version": 1, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "ema": None if ema is None else ema.state_dict(),
                     "history": history, "sums": sums, "args": args,
                     "elapsed": elapsed_before + time.perf_counter() - started}
            ltmp_core.write_atomic(out / LAST, lambda tmp: torch.save(state, tmp))

        def evaluated(module: nn.Module, split: str) -> Any:
            return evaluate(module, data.split_batches(split, batch), device=device, amp=amp, mode="dynamic")

        unreduced = ltmp_core.unreduced_macs(geometry)
        while step < total_steps:
            epoch, first = divmod(step, steps_per_epoch)
            positions = epoch_steps(n, batch, s.seed, epoch, rank, world)[first:]
            net.train(s.recipe == "full")
            for x, y in data.train_epoch(positions, s.seed, epoch, augment):
                _seed_step(s.seed, step, rank)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                soft_y = None
                if mixup is not None:
                    x, soft_y = mixup(x, y)
                with autocast(device, amp):
                    logits = net(x).float()
                    if soft_y is not None:
                        task = torch.sum(-soft_y * F.log_softmax(logits, dim=-1), dim=-1).mean()
                    else:
                        task = F.cross_entropy(logits, y, label_smoothing=s.smoothing)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(x).float()
                        kd = F.kl_div(F.log_softmax(logits / DISTILL_TAU, dim=-1),
                                      F.log_softmax(t_logits / DISTILL_TAU, dim=-1), reduction="batchmean",
                                      log_target=True) * DISTILL_TAU ** 2
                        task = (1 - DISTILL_ALPHA) * task + DISTILL_ALPHA * kd
                ratio = ltmp_core.expected_flops_ratio(model)
                if world > 1:  # the ratio of the whole batch, as one process would see it (with its gradient)
                    from torch.distributed.nn.functional import all_reduce

                    ratio = all_reduce(ratio) / world
                term = (aim - ratio) ** 2
                loss = task + s.budget_weight * term
                if not torch.isfinite(loss):
                    raise LTMPError(f"train: the loss is {loss.item()} at step {step + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if s.clip_grad is not None:
                    from timm.utils import dispatch_clip_grad

                    dispatch_clip_grad([p for p in model.parameters() if p.requires_grad], s.clip_grad)
                optimizer.step()
                if s.recipe == "ltmp":
                    _clamp(model)
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(model, step=step)
                task_v, term_v, ratio_v = task.item(), term.item(), ratio.item()
                sums = {"loss": sums["loss"] + task_v, "budget": sums["budget"] + term_v,
                        "ratio": sums["ratio"] + ratio_v, "n": sums["n"] + 1}
                if on_step is not None:
                    on_step({"step": step, "steps": total_steps, "epoch": epoch + 1, "epochs": s.epochs,
                             "loss": task_v, "budget": term_v, "flops_ratio": ratio_v,
                             "lr": optimizer.param_groups[0]["lr"]})
                if step % steps_per_epoch and step % s.save_every == 0:
                    save(step)
            if step % steps_per_epoch:  # the epoch's data ran short (unreadable images): count it done
                step = (step // steps_per_epoch + 1) * steps_per_epoch
            if rank == 0:
                evaluated_model = ema.module if ema is not None else model
                ev = evaluated(evaluated_model, "select")
                k = max(1, sums["n"])
                row = {"epoch": epoch + 1, "train_loss": sums["loss"] / k, "budget_term": sums["budget"] / k,
                       "train_flops_ratio": sums["ratio"] / k, "eval_top1": ev.accuracy, "eval_top5": ev.top5,
                       "eval_flops_ratio": ev.macs / unreduced, "lr": optimizer.param_groups[0]["lr"],
                       "seconds": elapsed_before + time.perf_counter() - started}
                history.append(row)
                _write_text(out / SUMMARY, _summary_csv(history))
                if on_epoch is not None:
                    on_epoch(row)
            sums = {"loss": 0.0, "budget": 0.0, "ratio": 0.0, "n": 0}
            save(step)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()

        final: dict[str, Any] = {}
        if rank == 0:
            final = _finish(model if ema is None else ema.module, calibration=calibration, data=data, config=config,
                            settings=s, out=out, plan=plan, target=target, aim=aim, device=device, amp=amp, batch=batch,
                            geometry=geometry, info=info, config_facts=config_facts, steps=step, base_top1=base_top1)
        return TrainResult(out=out, epochs=s.epochs, steps=step, resumed_at=resumed_at, history=history, final=final)


def _static_budgets(plan: ReductionPlan, aim: float) -> ReductionPlan:
    """The budgets static mode keeps: the shape the thresholds kept on the select split (each layer's
    mean fraction), scaled by one factor so that the static model costs ``aim``. (Mean counts per layer
    are not the mean cost: the fixed counts alone would miss the ratio the thresholds reached.)"""
    weights = [0.0 if layer.op == "none" else -math.log(max(layer.keep, 1e-9)) for layer in plan.layers]
    if not any(weights):
        return plan
    try:
        keeps = ltmp_core.budgets_for_ratio(plan.ops, weights, plan.geometry, aim, static=True, like=plan.layers)
    except LTMPError:  # the shape cannot reach the aim in whole tokens: keep the measured budgets
        return plan
    return plan.with_layers(keep=keeps)


def _finish(model: nn.Module, *, calibration: Tensor, data: StudyData, config: StudyConfig, settings: TrainSettings, out: Path,
            plan: ReductionPlan, target: float, aim: float, device: torch.device, amp: bool, batch: int,
            geometry: ltmp_core.ViTGeometry, info: dict[str, Any], config_facts: dict[str, Any], steps: int,
            base_top1: float | None) -> dict[str, Any]:
    """Final figures on the select and test splits, the plan with the counts the thresholds keep, and the
    model file; then the resume checkpoint is removed (the run is whole).

    The budget term holds the soft-mode ratio at the aim, and hard mode may cost a little more. A model
    whose measured ratio on the select split is over the aim gets one shared shift of its thresholds
    (:func:`ltmp_core.calibrate_to_flops` on the calibration batch, the learned thresholds as offsets)
    that brings it back onto the aim; ``shifted_to_aim`` says so.
    """
    from .objective import _with_measured_keeps

    unreduced = ltmp_core.unreduced_macs(geometry)
    select = evaluate(model, data.split_batches("select", batch), device=device, amp=amp, mode="dynamic")
    shifted = select.macs / unreduced > aim
    if shifted:
        try:
            ltmp_core.calibrate_to_flops(model, calibration.to(device), aim)
        except ltmp_core.Unreachable as e:
            raise LTMPError(f"train: the trained model is over the FLOPs target and cannot be brought back ({e})") \
                from None
        select = evaluate(model, data.split_batches("select", batch), device=device, amp=amp, mode="dynamic")
    test = evaluate(model, data.split_batches("test", batch), device=device, amp=amp, mode="dynamic")
    trained = _static_budgets(_with_measured_keeps(ltmp_core.get_plan(model), select.kept_tokens, geometry), aim)
    facts = {
        "recipe": settings.recipe, "epochs": settings.epochs, "steps": steps, "target_flops_ratio": target,
        "aim": aim, "shifted_to_aim": shifted, "select_top1": select.accuracy, "select_flops_ratio": select.macs / unreduced,
        "test_top1": test.accuracy, "test_top5": test.top5, "test_flops_ratio": test.macs / unreduced,
        "base_test_top1": base_top1,
        "search_top1": plan.meta.get("top1"), "config": config_facts, "model_kwargs": dict(config.model_kwargs), "weights": info.get("source"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    facts["static_flops_ratio"] = ltmp_core.plan_flops_ratio(trained, static=True)
    trained = replace(trained, model=plan.model or config.model, meta={**plan.meta, "trained": facts})
    ltmp_core.save_trained(model, out / MODEL_FILE, plan=trained, facts=facts)
    ltmp_core.save_plan(trained, out / PLAN_FILE)
    (out / LAST).unlink(missing_ok=True)
    return facts
