"""``search validate``: the figures to report for a plan, on a split of a data set.

Top-1 and top-5 accuracy and the measured FLOPs of the plan applied to its base model, with tokens
really removed (dynamic mode when the plan carries thresholds, else static), on the test split (the
built-in data's test split, or ``val/`` of an ImageNet-layout folder) or on the select split the
search scored its trials on.
"""

from __future__ import annotations

import time
from typing import Any

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from .config import StudyConfig, resolve
from .data import SPLITS
from .finetune import evaluate, unreduced_accuracy
from .models import load_base_model
from .prepare import compile_static, open_data, resolve_device
from .width import WidthCut, cut_width, width_cut_for

__all__ = ["validate_plan", "plan_config", "read_any", "TRAINED_SETTINGS"]

#: Settings a trained model's file carries that ``search validate`` reuses (its data and model).
TRAINED_SETTINGS = ("model", "model_kwargs", "data", "img_size", "holdout", "test_images", "batch_size")


def read_any(path: str) -> tuple[ReductionPlan, dict[str, Any] | None]:
    """An exported plan (``None`` beside it), or a model trained by ``search train`` (``.safetensors``):
    its plan and the settings to validate it with (its data and model, its own weights)."""
    if not str(path).endswith(".safetensors"):
        return ltmp_core.load_plan(path), None
    _, plan, facts = ltmp_core.read_trained(path, weights=False)
    config = facts.get("config") or {}
    settings = {k: config[k] for k in TRAINED_SETTINGS if k in config}
    settings.update(checkpoint=str(path), preset=config.get("preset"))
    return plan, settings


def plan_config(plan: ReductionPlan, preset: str | None, overrides: dict[str, Any]) -> StudyConfig:
    """The configuration to validate ``plan`` with: the preset's, the plan's own model at the size it
    was searched at unless the flags name another model or size, then the flags."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "model" not in given and plan.model:
        given["model"] = plan.model
        if "img_size" not in given and plan.geometry is not None:
            given["img_size"] = plan.geometry.img_size[0]
    return resolve(preset, given)


def validate_plan(
    plan: ReductionPlan | str,
    config: StudyConfig,
    *,
    split: str = "test",
    mode: str | None = None,
    compile: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``plan`` (or the plan file at that path) on ``config``'s model, data and preprocessing.

    ``search validate`` puts the plan's own model and input size into ``config`` unless the user
    named others. A plan applies to any timm ViT (its budgets are fractions, its thresholds relative
    scores); when the model's token grid differs from the one the plan was searched on, the result
    says so in ``geometry_note``. ``name`` labels the plan in the result (default: its path).
    """
    if not isinstance(plan, ReductionPlan):
        name = name or str(plan)
        plan = ltmp_core.load_plan(plan)
    split = {"val": "test", "holdout": "select"}.get(split, split)
    if split not in SPLITS:
        raise LTMPError(f"--split: expected test or select, got {split!r}")
    has_thresholds = all(
        getattr(layer, name) is not None for layer in plan.layers for name in layer.needs())
    mode = mode or ("dynamic" if has_thresholds else "static")
    if mode == "dynamic" and not has_thresholds:
        raise LTMPError("mode: the plan has no learned thresholds; use --mode static (fixed token counts)")
    device = resolve_device(config.device)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    data = open_data(config, device, holdout=split == "select")
    model, info = load_base_model(
        config.model, data, img_size=config.img_size, model_kwargs=config.model_kwargs,
        pretrained=config.pretrained, checkpoint=config.checkpoint, base_epochs=config.base_epochs,
    )
    model.to(device)
    base_top1, base_top5 = unreduced_accuracy(model, data.split_batches(split, config.batch_size), device=device,
                                              amp=amp)
    # An exported plan that cuts width: the base model is cut as its trial cut it (same criterion, images, seed).
    plan = cut_width(model, plan, data, WidthCut.of(plan, width_cut_for(config)), device=device, amp=amp)
    ltmp_core.apply_plan(model, plan, mode=mode)
    model.to(device)  # the thresholds the plan added
    geometry = ltmp_core.ViTGeometry.from_model(model)
    note = None
    if plan.geometry is not None and plan.geometry.num_patches != geometry.num_patches:
        note = (f"the plan was searched on {plan.geometry.num_patches} patches ({plan.geometry.img_size[0]} px); "
                f"{config.model} here has {geometry.num_patches} ({geometry.img_size[0]} px)")
    batches = data.split_batches(split, config.batch_size)
    runner = model
    if compile:
        if mode != "static":
            raise LTMPError("compile: only the static mode has fixed shapes; add --mode static")
        runner = compile_static(model, device)
    start = time.perf_counter()
    result = evaluate(model, batches, device=device, amp=amp, mode=mode, runner=runner)
    seconds = time.perf_counter() - start
    unreduced = ltmp_core.unreduced_macs(geometry)
    return {
        "plan": name or "plan",
        "model": config.model,
        "weights": info["source"],
        "data": config.data,
        "split": split,
        "mode": mode,
        "images": result.images,
        "top1": result.accuracy,
        "top5": result.top5,
        "base_top1": base_top1,
        "base_top5": base_top5,
        "top1_drop": base_top1 - result.accuracy,
        "gmacs": result.macs / 1e9,
        "flops_ratio": result.macs / unreduced,
        "kept_tokens": result.kept_tokens,
        "seconds": seconds,
        "images_per_s": result.images / seconds if seconds > 0 else None,
        "device": str(device),
        "skipped_images": data.skipped(),
        "geometry_note": note,
    }
