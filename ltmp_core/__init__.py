"""ltmp_core: learned-threshold token merging, pruning and squeezing for timm ViTs.

Pure PyTorch + timm. A plan says what each block does (``none``, ``merge``, ``prune``,
``squeeze``, ``merge+prune``, ``merge+squeeze``) and how many tokens it keeps; ``apply_plan``
patches a timm model in place to follow it::

    import timm, ltmp_core

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=0.8)
    ltmp_core.apply_plan(model, plan, mode="static")
    macs = ltmp_core.count_flops(model)
"""

from .errors import LTMPError
from .flops import (
    budgets_for_ratio,
    count_flops,
    expected_flops_ratio,
    flops_budget_loss,
    image_macs,
    kept_fractions,
    layer_budget_loss,
    macs_from_counts,
    measure_flops,
    plan_flops_ratio,
    plan_macs,
    unreduced_macs,
)
from .geometry import ViTGeometry, check_model
from .patch import (
    MODES,
    apply_plan,
    calibrate,
    get_mode,
    get_plan,
    is_patched,
    remove_plan,
    set_mode,
    threshold_parameters,
    threshold_scales,
    token_counts,
    trace_tokens,
    TokenTrace,
)
from .plan import OPS, LayerPlan, ReductionPlan, load_plan, make_plan, save_plan, stage_counts
from .reducers import KEPT, MERGED, PRUNED, REDUCERS, SQUEEZED, Tokens, register_reducer

__version__ = "0.1.0"

__all__ = [
    "KEPT",
    "LTMPError",
    "MERGED",
    "PRUNED",
    "SQUEEZED",
    "MODES",
    "OPS",
    "REDUCERS",
    "LayerPlan",
    "ReductionPlan",
    "Tokens",
    "ViTGeometry",
    "apply_plan",
    "budgets_for_ratio",
    "calibrate",
    "check_model",
    "count_flops",
    "expected_flops_ratio",
    "flops_budget_loss",
    "get_mode",
    "get_plan",
    "image_macs",
    "is_patched",
    "kept_fractions",
    "layer_budget_loss",
    "load_plan",
    "macs_from_counts",
    "make_plan",
    "measure_flops",
    "plan_flops_ratio",
    "plan_macs",
    "register_reducer",
    "remove_plan",
    "save_plan",
    "set_mode",
    "stage_counts",
    "threshold_parameters",
    "threshold_scales",
    "token_counts",
    "trace_tokens",
    "TokenTrace",
    "unreduced_macs",
]
