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

from ..setup.budget import Budget
from ..setup.config import StudyConfig
from ..setup.data import SPLITS
from .program import compile_static
from ..setup.evaluation import evaluate, pack_correct, unreduced_accuracy
from ..setup.workbench import Workbench

__all__ = ["validate_plan", "read_any", "TRAINED_SETTINGS"]

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


def validate_plan(
    plan: ReductionPlan | str,
    config: StudyConfig,
    *,
    split: str = "test",
    mode: str | None = None,
    compile: bool = False,
    name: str | None = None,
    per_image: bool = False,
) -> dict[str, Any]:
    """Evaluate ``plan`` (or the plan file at that path) on ``config``'s model, data and preprocessing.

    ``search validate`` puts the plan's own model and input size into ``config`` unless the user
    named others (:func:`search.setup.config.plan_config`). A plan applies to any timm ViT (its budgets are
    fractions, its thresholds relative scores); when the model's token grid differs from the one the
    plan was searched on, the result says so in ``geometry_note``. ``name`` labels the plan in the
    result (default: its path). The plan's budget (its study's target and aim) is reported beside
    the measured ratio. ``per_image``: the result also holds ``correct``, which images of the split
    the plan got right, in the split's order (:func:`search.setup.evaluation.pack_correct`).
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
    if compile and mode != "static":
        raise LTMPError("compile: only the static mode has fixed shapes; add --mode static")
    bench = Workbench.open(config, holdout=split == "select")
    base_top1, base_top5 = unreduced_accuracy(bench.base, bench.data.split_batches(split, config.batch_size),
                                              device=bench.device, amp=bench.amp)
    # An exported plan that cuts width: the base model is cut as its trial cut it (same criterion, images, seed).
    model, plan = bench.reduced(plan, mode, fresh=False)
    geometry = ltmp_core.ViTGeometry.from_model(model)
    note = None
    if plan.geometry is not None and plan.geometry.num_patches != geometry.num_patches:
        note = (f"the plan was searched on {plan.geometry.num_patches} patches ({plan.geometry.img_size[0]} px); "
                f"{config.model} here has {geometry.num_patches} ({geometry.img_size[0]} px)")
    runner = compile_static(model, bench.device) if compile else model
    start = time.perf_counter()
    result = evaluate(model, bench.data.split_batches(split, config.batch_size), device=bench.device, amp=bench.amp,
                      mode=mode, runner=runner, per_image=per_image)
    seconds = time.perf_counter() - start
    ratio = result.macs / ltmp_core.unreduced_macs(geometry)
    budget = Budget.from_meta(plan.meta)
    return {
        "plan": name or "plan",
        "model": config.model,
        "weights": bench.info["source"],
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
        "flops_ratio": ratio,
        **(budget.to_meta() if budget is not None else {}),
        "within_target": None if budget is None else ratio <= budget.target,
        "kept_tokens": result.kept_tokens,
        "seconds": seconds,
        "images_per_s": result.images / seconds if seconds > 0 else None,
        "device": str(bench.device),
        "skipped_images": bench.data.skipped(),
        "geometry_note": note,
        **({"correct": pack_correct(result.correct)} if per_image else {}),
    }
