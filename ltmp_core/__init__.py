"""ltmp_core: learned-threshold token merging, pruning and squeezing for timm ViTs.

Pure PyTorch + timm. A plan says what each block does (``none``, ``merge``, ``prune``,
``squeeze``, ``merge+prune``, ``merge+squeeze``) and how many tokens it keeps; ``apply_plan``
patches a timm model in place to follow it::

    import timm, ltmp_core

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.8)
    ltmp_core.apply_plan(model, plan, mode="static")
    macs = ltmp_core.count_flops(model)

A plan may also keep fewer attention heads and MLP hidden units per block:
``ltmp_core.prune_width(model, plan, images)`` cuts them (through torch-pruning) before
``apply_plan``.

A model trained with a plan (``search train``) is one safetensors file: weights and plan with its
learned thresholds; ``ltmp_core.load_trained(path)`` applies both.

The public names load their module on first use (PEP 562), so that the plan vocabulary, the plan
JSON and :class:`LTMPError` are available without importing torch and timm (a command line can
check its arguments in milliseconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    "LTMPError": "errors",
    "Unreachable": "errors",
    **{name: "flops" for name in (
        "budgets_for_ratio", "calibrate_to_flops", "count_flops", "expected_flops_ratio", "flops_budget_loss", "image_macs",
        "kept_fractions", "layer_budget_loss", "macs_from_counts", "measure_flops", "model_geometry",
        "plan_flops_ratio",
        "plan_macs", "static_budgets", "unreduced_macs")},
    "ViTGeometry": "geometry",
    "SUPPORTED_MODELS": "geometry",
    **{name: "files" for name in ("state_dict_mismatch", "write_atomic")},
    "check_model": "geometry",
    "block_widths": "geometry",
    "prune_width": "width",
    **{name: "patch" for name in (
        "FORMS", "MODES", "SOFT_FORMS", "THRESHOLDS", "apply_plan", "calibrate", "clamp_thresholds", "get_mode",
        "get_plan", "get_soft_form",
        "is_patched", "measure_scales", "own_counts", "reduction_form", "set_thresholds", "thresholds",
        "remove_plan", "set_mode", "threshold_names", "threshold_parameters", "threshold_scales", "token_counts", "trace_tokens",
        "TokenTrace")},
    **{name: "plan" for name in (
        "IMPORTANCE", "OPS", "WIDTH_IMPORTANCE", "LayerPlan", "ReductionPlan", "kept_count", "load_plan", "lowest_keep",
        "make_plan", "measured_plan", "save_plan", "stage_counts", "static_stages")},
    **{name: "reducers" for name in ("KEPT", "MERGED", "PRUNED", "REDUCERS", "SQUEEZED", "Compact", "Tokens",
                                     "register_reducer")},
    **{name: "trained" for name in ("TRAINED_FORMAT", "load_trained", "read_trained", "save_trained")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ltmp_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static checkers and IDEs see
    from .errors import LTMPError, Unreachable
    from .flops import (
        budgets_for_ratio, calibrate_to_flops, count_flops, expected_flops_ratio, flops_budget_loss, image_macs, kept_fractions,
        layer_budget_loss, macs_from_counts, measure_flops, model_geometry, plan_flops_ratio, plan_macs, static_budgets,
        unreduced_macs,
    )
    from .files import state_dict_mismatch, write_atomic
    from .geometry import SUPPORTED_MODELS, ViTGeometry, block_widths, check_model
    from .patch import (
        FORMS, MODES, SOFT_FORMS, THRESHOLDS, TokenTrace, apply_plan, calibrate, clamp_thresholds, get_mode, get_plan,
        get_soft_form, is_patched,
        measure_scales, own_counts, reduction_form, set_thresholds, thresholds,
        remove_plan, set_mode, threshold_names, threshold_parameters, threshold_scales, token_counts, trace_tokens,
    )
    from .plan import (
        IMPORTANCE, OPS, WIDTH_IMPORTANCE, LayerPlan, ReductionPlan, kept_count, load_plan, lowest_keep, make_plan,
        measured_plan, save_plan, stage_counts, static_stages,
    )
    from .reducers import KEPT, MERGED, PRUNED, REDUCERS, SQUEEZED, Compact, Tokens, register_reducer
    from .trained import TRAINED_FORMAT, load_trained, read_trained, save_trained
    from .width import prune_width
