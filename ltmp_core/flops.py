"""The one place that counts FLOPs: analytic, measured on data, and differentiable.

Convention: as in the papers, "FLOPs" are multiply-accumulates (MACs): DeiT-S at 224 px is 4.6 G.
``torch.utils.flop_counter.FlopCounterMode`` counts two FLOPs per MAC, so it reports twice these
figures. Every function here returns MACs.

The cost of a block whose attention sees ``n`` tokens (prefix included) and whose MLP sees ``m``::

    attn_macs_per_token * h / H * n        qkv, proj (and gate) linears of the h heads it keeps
    + 2 * h * head_dim * n**2              q @ k^T and attn @ v
    + similarity products                  the reducers' matching (merge, squeeze), as the mode runs it
    + mlp_macs_per_token * u / U * m       MLP linears of the u hidden units it keeps

(``H`` heads and ``U`` hidden units in the unreduced block: every attention linear has the heads'
width on one side and every MLP linear the hidden width, so their cost is proportional to it)

plus the patch embedding and the classifier head once per image. The similarity products differ
by mode: the masked reducers of soft and dynamic mode compare all ``n x n`` pairs of the block's
sequence in every merge or squeeze stage (``head_dim`` wide, or ``embed_dim`` for TPS's squeeze);
static mode's fast forms compare only what they need, and a static stage that removes nothing
compares nothing and scores nothing (:func:`block_macs`). Elementwise work (softmax, norms, scatters, top-k) is not
counted, as neither the papers nor PyTorch's counter count it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .errors import LTMPError, Unreachable
from .geometry import ViTGeometry, block_widths
from .patch import (
    THRESHOLDS, first_batch, get_mode, get_plan, is_patched, measure_scales, own_counts, reduction_form, set_mode,
    set_thresholds, token_counts,
)
from .plan import OPS, LayerPlan, ReductionPlan, kept_count, lowest_keep, stage_counts
from .reducers import REDUCERS

__all__ = [
    "similarities",
    "block_macs",
    "macs_from_counts",
    "unreduced_macs",
    "plan_macs",
    "plan_flops_ratio",
    "budgets_for_ratio",
    "static_budgets",
    "count_flops",
    "image_macs",
    "measure_flops",
    "expected_flops_ratio",
    "flops_budget_loss",
    "layer_budget_loss",
    "kept_fractions",
    "calibrate_to_flops",
    "model_geometry",
]

Number = Any  # float, int or Tensor: the formulas below are plain arithmetic and work on all three
ImgSize = int | tuple[int, int]  # pixels: one side of a square, or (height, width)


def similarities(op: str) -> int:
    """Number of ``N x N`` similarity matrices the masked reducers of an operation compute."""
    return sum(REDUCERS[stage].similarities for stage in OPS[op])


def _stage_width(g: ViTGeometry, layer: LayerPlan, stage: str) -> int:
    """Width of a stage's similarity features: the keys' head mean (``head_dim``), or TPS's token features."""
    return g.embed_dim if stage == "squeeze" and layer.squeeze_host == "tps" else g.head_dim


def _static_form(ops: Sequence[LayerPlan | str]) -> str:
    """What static mode runs for these layers (:data:`ltmp_core.FORMS`): the stages' fast forms when
    every stage has one, as the patched blocks decide, else the masked reducers with top-k."""
    names = {s for op in ops for s in OPS[op if isinstance(op, str) else op.op]}
    return "compact" if all(REDUCERS[s].static is not None for s in names) else "top-k"


def _whole(n: Number) -> int:
    """A static count as an int: static mode keeps the same whole number of tokens in every image."""
    if isinstance(n, Tensor):
        flat = n.detach().flatten()
        if flat.numel() > 1 and bool((flat != flat[0]).any()):
            raise LTMPError("counts: static mode keeps the same count in every image; these differ")
        n = float(flat[0])
    return int(round(n))


def _stage_sizes(p_in: int, p_out: int, op: LayerPlan | str) -> list[tuple[int, int]]:
    """``(patch tokens entering, tokens removed)`` of every stage of a static block.

    The first stage of a two-stage op stops where :func:`ltmp_core.stage_counts` says (for an op
    given by name, with the default split of a layer that keeps ``p_out / p_in``).
    """
    name = op if isinstance(op, str) else op.op
    stages = OPS[name]
    if len(stages) < 2:
        return [(p_in, p_in - p_out)] * len(stages)
    layer = op if not isinstance(op, str) else LayerPlan(op=name, keep=min(1.0, max(p_out, 1) / max(p_in, 1)))
    mid = min(p_in, max(p_out, stage_counts(p_in, layer)[0]))
    return [(p_in, p_in - mid), (mid, mid - p_out)]


def _similarity_macs(g: ViTGeometry, n_in: Number, n_out: Number, op: LayerPlan | str, form: str) -> Number:
    """MACs of a block's similarity products (the reducers' matching), as the pass ``form`` runs them.

    ``masked``: every stage with similarities compares all ``n_in x n_in`` pairs of the block's
    sequence (prefix included: the masked reducers mask, they do not narrow). ``top-k``: the same, but
    a stage that removes nothing is skipped. ``compact``: a stage that removes ``r > 0`` of the ``n``
    live patch tokens reaching it compares ``Reducer.static_pairs(n, r)`` pairs (a merge its sources
    with its destinations, a squeeze its pruned tokens with the kept ones).
    """
    layer = LayerPlan() if isinstance(op, str) else op  # an op by name: key similarities
    stages = OPS[op if isinstance(op, str) else op.op]
    width = [_stage_width(g, layer, s) for s in stages]
    if form == "masked":
        return sum(REDUCERS[s].similarities * w for s, w in zip(stages, width)) * n_in * n_in
    if not any(REDUCERS[s].similarities or REDUCERS[s].static_pairs for s in stages):
        return 0
    n, prefix = _whole(n_in), g.num_prefix_tokens
    total = 0
    for stage, w, (entering, removed) in zip(stages, width, _stage_sizes(n - prefix, _whole(n_out) - prefix, op)):
        reducer = REDUCERS[stage]
        if removed <= 0:
            continue
        if form == "compact" and reducer.static_pairs is not None:
            total += reducer.static_pairs(entering, removed) * w
        else:
            total += reducer.similarities * n * n * w
    return total


def _block_macs(g: ViTGeometry, n_in: Number, n_out: Number, op: LayerPlan | str, form: str) -> Number:
    name = op if isinstance(op, str) else op.op
    scored = OPS[name]
    if form == "compact":  # static mode's fast forms run only the stages that remove tokens
        prefix = g.num_prefix_tokens
        sizes = _stage_sizes(_whole(n_in) - prefix, _whole(n_out) - prefix, op)
        scored = tuple(s for s, (_, removed) in zip(scored, sizes) if removed > 0)
    cls_row = (not isinstance(op, str) and op.importance == "cls"
               and any(REDUCERS[s].needs_importance for s in scored))
    heads = (None if isinstance(op, str) else op.heads) or g.num_heads
    hidden = (None if isinstance(op, str) else op.mlp_hidden) or g.mlp_hidden
    attn_dim = heads * g.head_dim
    # Exact in integers: the attention linears cost a multiple of the head count, the MLP's of its width.
    attn_linear = g.attn_macs_per_token * heads // g.num_heads
    mlp = g.mlp_macs_per_token * hidden // g.mlp_hidden
    linear = attn_linear + (attn_dim if cls_row else 0)
    return (linear * n_in + 2 * attn_dim * n_in * n_in + _similarity_macs(g, n_in, n_out, op, form)
            + mlp * n_out)


def block_macs(g: ViTGeometry, n_in: Number, n_out: Number, op: LayerPlan | str = "none", *,
               static: bool = False) -> Number:
    """MACs of one block: ``n_in`` tokens enter attention, ``n_out`` enter the MLP (prefix included).

    ``op`` is the block's :class:`LayerPlan` (or just its op name, at full width): its ``heads`` and
    ``mlp_hidden`` set the widths; a prune or squeeze scored by ``cls`` importance adds the class
    query's row of attention logits, ``attn_dim * n_in`` (in static mode's fast forms only where that
    stage removes tokens: a stage that removes nothing is not run); a TPS squeeze compares token features
    (``embed_dim`` wide) instead of keys (``head_dim``).

    The reducers' similarity products are counted as the mode runs them. ``static=False`` (soft and
    dynamic mode, the masked reducers): every merge or squeeze stage compares all ``n_in x n_in``
    pairs. ``static=True`` (hard-static mode, whole-number counts): a stage that removes nothing
    compares nothing, and the fast forms compare only what they need: a merge the ``ceil(P/2) x
    floor(P/2)`` sources and destinations of the ``P`` live patch tokens, a squeeze its ``r`` pruned
    tokens with the ``P - r`` kept ones (where a stage has no fast form, static mode runs the masked
    form, counted as such). A two-stage op given by name splits its cut by the default ``merge_keep``.
    """
    form = _static_form([op]) if static else "masked"
    return _block_macs(g, n_in, n_out, op, form)


def _macs(g: ViTGeometry, counts: Sequence[Number], ops: Sequence[LayerPlan | str], form: str) -> Number:
    if len(counts) != g.depth + 1 or len(ops) != g.depth:
        raise LTMPError(f"counts: need {g.depth + 1} token counts and {g.depth} ops, got {len(counts)} and {len(ops)}")
    total: Number = g.embed_macs + g.head_macs
    if g.pool_macs_per_token:  # an attention-pool head: the latent queries attend over the last tokens
        total = total + g.pool_macs_per_token * (counts[-1] - g.num_prefix_tokens * g.pool_skips_prefix)
    for i, op in enumerate(ops):
        total = total + _block_macs(g, counts[i], counts[i + 1], op, form)
    return total


def macs_from_counts(g: ViTGeometry, counts: Sequence[Number], ops: Sequence[LayerPlan | str], *,
                     static: bool = False) -> Number:
    """MACs of one image from its token counts.

    Args:
        g: The model's geometry.
        counts: ``depth + 1`` token counts, prefix included: the input of block 0, then what each
            block passes on (as :func:`ltmp_core.token_counts` returns). Tensors of any shape work
            elementwise, e.g. one count per image.
        ops: Every block's :class:`LayerPlan` (or op name).
        static: The counts are hard-static mode's (whole numbers, the same in every image): count
            the similarity work static mode runs (see :func:`block_macs`), not the masked reducers'.
    """
    return _macs(g, counts, ops, _static_form(ops) if static else "masked")


def unreduced_macs(g: ViTGeometry) -> int:
    """MACs of one image through the stock model."""
    return int(macs_from_counts(g, [g.num_tokens] * (g.depth + 1), ["none"] * g.depth))


def _model_layers(model: nn.Module) -> tuple[LayerPlan, ...]:
    """What each block of a model does: its plan's layers when patched, else none at its own width."""
    if is_patched(model):
        return get_plan(model).layers
    return tuple(LayerPlan(heads=h, mlp_hidden=m) for h, m in block_widths(model))


def _plan_counts(plan: ReductionPlan, g: ViTGeometry, static: bool) -> list[float]:
    if static:
        return [g.num_tokens] + [g.num_prefix_tokens + n for n in plan.static_counts(g.num_patches)]
    counts, n = [float(g.num_tokens)], float(g.num_patches)
    for layer in plan.layers:
        n = n * layer.keep
        counts.append(g.num_prefix_tokens + n)
    return counts


def _geometry(plan: ReductionPlan, geometry: ViTGeometry | None, img_size: ImgSize | None = None) -> ViTGeometry:
    g = geometry if geometry is not None else plan.geometry
    if g is None:
        raise LTMPError("geometry: the plan carries no geometry; pass the model's ViTGeometry")
    if g.depth != plan.depth:
        raise LTMPError(f"plan: {plan.depth} layers for a model of depth {g.depth}")
    return g if img_size is None else g.at_size(img_size)


def plan_macs(plan: ReductionPlan, geometry: ViTGeometry | None = None, *, static: bool = False,
              img_size: ImgSize | None = None) -> float:
    """Predicted MACs of one image under ``plan``.

    With ``static=False`` token counts follow the budgets continuously (``n * keep``, the mean a
    dynamic plan aims at) and the reducers' similarities are the masked reducers' of dynamic mode;
    with ``static=True`` they are the integer counts of hard-static mode and the similarity work its
    fast forms run (:func:`block_macs`): the cost of the deployed model. ``img_size`` (pixels, ``int``
    or ``(height, width)``): the cost at that input size (a ``dynamic_img_size`` model), with the
    token counts static mode keeps of that many patches; default, the geometry's own size.
    """
    g = _geometry(plan, geometry, img_size)
    return float(macs_from_counts(g, _plan_counts(plan, g, static), plan.layers, static=static))


def plan_flops_ratio(plan: ReductionPlan, geometry: ViTGeometry | None = None, *, static: bool = False,
                     img_size: ImgSize | None = None) -> float:
    """Predicted FLOPs of ``plan`` as a fraction of the unreduced model's at the same input size
    (see :func:`plan_macs`).

    Non-decreasing in every layer's ``keep``, with one exception in static mode: a merge that stops
    removing anything (one token to none) also stops matching, which at several hundred tokens can
    save more than the token it kept costs (for a late layer of ViT-S at 577 tokens, 0.03% of the
    model). That bump sits where a layer removes a single token, so the ratios :func:`budgets_for_ratio`
    bisects on stay ordered around any target well below 1.
    """
    g = _geometry(plan, geometry, img_size)
    return plan_macs(plan, g, static=static) / unreduced_macs(g)


def budgets_for_ratio(
    ops: Sequence[str],
    weights: Sequence[float],
    geometry: ViTGeometry,
    target: float,
    *,
    tol: float = 1e-4,
    static: bool = False,
    like: Sequence[LayerPlan] | None = None,
) -> list[float]:
    """Per-layer ``keep`` budgets with predicted FLOPs ratio ``target``.

    Layer ``l`` keeps ``max(floor_l, exp(-s * weights[l] / max(weights)))``, where ``floor_l`` is
    what its op can reach (0.5 for a merge, one token otherwise, 1 for ``none``). Weights are
    compared among the reducing layers only (a ``none`` layer's weight is ignored); those below
    1e-6 of the largest of them count as zero (the layer keeps everything). The one factor ``s >= 0`` is
    found by bisection on :func:`plan_flops_ratio`, which is monotone in ``s``. The result's ratio
    is within ``tol`` (relative) of ``target``. With ``static``, the ratio is that of static mode's
    whole-token counts (:func:`plan_flops_ratio` with ``static=True``), and the result is the cheapest
    step at or under ``target`` (whole tokens rarely land on it exactly). ``like``: the plan's
    layers, whose other fields count too (the heads and MLP units a block keeps, ``cls`` importance,
    TPS's squeeze host): the budgets then cut tokens for what the width does not.

    Raises:
        LTMPError: the target cannot be reached with these ops and weights (too few reducing
            layers, or all weights zero), or the inputs are malformed.
    """
    depth = geometry.depth
    if len(ops) != depth or len(weights) != depth:
        raise LTMPError(f"ops/weights: need {depth} of each, got {len(ops)} and {len(weights)}")
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target):
        raise LTMPError(f"target: must be a positive number, got {target!r}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise LTMPError("weights: must be finite and >= 0")
    if like is not None and len(like) != depth:
        raise LTMPError(f"like: need {depth} layers, got {len(like)}")
    templates = list(like) if like is not None else [LayerPlan()] * depth
    floors = [lowest_keep(op, geometry.num_patches) for op in ops]
    weights = [0.0 if op == "none" else float(w) for op, w in zip(ops, weights)]
    # Only the proportions among reducing layers matter; below 1e-6 of the largest counts as zero.
    top = max(weights, default=0.0)
    weights = [w / top if top > 0 and w >= 1e-6 * top else 0.0 for w in weights]

    def keeps(s: float) -> list[float]:
        return [1.0 if w == 0 else max(f, math.exp(-s * w)) for f, w in zip(floors, weights)]

    def layers(keeps: list[float]) -> tuple[LayerPlan, ...]:
        return tuple(dataclasses.replace(t, op=o, keep=k, merge_keep=None) for o, k, t in zip(ops, keeps, templates))

    def ratio(s: float) -> float:
        return plan_flops_ratio(ReductionPlan(layers(keeps(s)), geometry=geometry), geometry, static=static)

    if target >= 1.0 or ratio(0.0) <= target:
        return keeps(0.0)
    floor_plan = ReductionPlan(layers([f if w > 0 else 1.0 for f, w in zip(floors, weights)]), geometry=geometry)
    lowest = plan_flops_ratio(floor_plan, geometry, static=static)
    if lowest > target * (1 - tol):
        raise LTMPError(
            f"target: a FLOPs ratio of {target:.3f} cannot be reached with these operations "
            f"(the lowest reachable is {lowest:.3f})"
        )
    lo, hi = 0.0, 1.0
    while ratio(hi) > target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        r = ratio(mid)
        if abs(r - target) <= tol * target and not (static and r > target):
            return keeps(mid)
        if r > target:
            lo = mid
        else:
            hi = mid
    return keeps(hi)


def static_budgets(plan: ReductionPlan, aim: float, geometry: ViTGeometry | None = None) -> ReductionPlan:
    """``plan`` with budgets of the same shape that static mode keeps at a FLOPs ratio ``aim``.

    The shape is the plan's budgets (typically what thresholds kept, :func:`ltmp_core.measured_plan`):
    every reducing layer's ``keep`` is raised to one common power ``p >= 0``, ``keep ** p`` (at least
    what its op can keep), and :func:`budgets_for_ratio` with ``static=True`` finds ``p``: the static
    model's whole-token counts cost at most ``aim``, as close under it as the shape's steps allow, or
    keep every token when that costs less. Mean counts per layer are not the mean cost, so a plan
    whose budgets are the mean counts of a dynamic run misses the ratio that run reached; this puts
    it back on it. Widths, importance and the other fields of each layer count (``like``); layers that
    keep everything keep everything, and a ``merge_keep`` under its new ``keep`` rises to it.

    Raises:
        LTMPError: no geometry, or ``aim`` cannot be reached with this shape in whole tokens (the
            message says the lowest reachable ratio).
    """
    g = geometry if geometry is not None else plan.geometry
    if g is None:
        raise LTMPError("geometry: the plan carries no geometry; pass the model's ViTGeometry")
    weights = [0.0 if layer.op == "none" else -math.log(max(layer.keep, 1e-9)) for layer in plan.layers]
    keeps = budgets_for_ratio(plan.ops, weights, g, aim, static=True, like=plan.layers)
    return plan.with_keeps(keeps)


def model_geometry(model: nn.Module, img_size: ImgSize | None = None) -> ViTGeometry:
    """The geometry of ``model`` on inputs of ``img_size`` pixels (default: the size it was built at).

    A model built with ``dynamic_img_size=True`` (or without a strict input size) takes other sizes:
    its token grid follows the input (``patch_embed.dynamic_feat_size``, padding included), and so
    must every FLOP figure.

    Raises:
        LTMPError: the model takes only the size it was built at, and ``img_size`` is another.
    """
    g = ViTGeometry.from_model(model)
    if img_size is None:
        return g
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    pe = model.patch_embed
    if (h, w) != g.img_size and getattr(pe, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False):
        raise LTMPError(f"img_size: the model takes {g.img_size[0]}x{g.img_size[1]} images only; build it with "
                        "dynamic_img_size=True to run it at other sizes")
    gh, gw = pe.dynamic_feat_size((h, w)) if hasattr(pe, "dynamic_feat_size") else (h // g.patch_size[0],
                                                                                      w // g.patch_size[1])
    return g.with_patches(int(gh) * int(gw), (h, w))


def _pass_geometry(model: nn.Module) -> ViTGeometry:
    """The model's geometry at the token count of its last forward pass (the input's size)."""
    g = ViTGeometry.from_model(model)
    n = _whole(token_counts(model)[0]) - g.num_prefix_tokens
    return g if n == g.num_patches else g.with_patches(n)


def count_flops(model: nn.Module, img_size: ImgSize | None = None) -> int:
    """MACs of one image: an unpatched model, or a patched one in static mode (at its widths).

    ``img_size`` (pixels, ``int`` or ``(height, width)``): the input size to count at, for a model
    built with ``dynamic_img_size=True``; default, the size the model was built at. Static mode keeps
    the plan's budgets of the tokens that size gives (:func:`ltmp_core.kept_count` of the actual count).
    """
    g = model_geometry(model, img_size)
    if not is_patched(model):
        return int(macs_from_counts(g, [g.num_tokens] * (g.depth + 1), _model_layers(model)))
    mode = get_mode(model)
    if mode != "static":
        raise LTMPError(
            f"model: count_flops needs an unpatched model or static mode (the model is in {mode!r} mode, "
            "whose cost depends on the images); use measure_flops(model, loader)"
        )
    return int(plan_macs(get_plan(model), g, static=True))


def image_macs(model: nn.Module) -> Tensor:
    """MACs of each image of the last forward pass of a patched model, from its token counts: ``[B]``.

    Padding inside a batch is not counted: each figure is what the image costs alone. The reducers'
    similarity work is counted as that pass ran it (:func:`ltmp_core.reduction_form`): the masked
    reducers in soft and dynamic mode, the fast forms in static mode.
    """
    g = _pass_geometry(model)
    counts = token_counts(model).double()
    form = reduction_form(model)
    if form == "masked":
        return _macs(g, list(counts), get_plan(model).layers, form)
    # Static counts: whole numbers, the same in every image, read from the host once.
    return _macs(g, list(counts.cpu()), get_plan(model).layers, form).to(counts.device)


@torch.no_grad()
def measure_flops(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    max_images: int | None = None,
) -> tuple[float, list[float]]:
    """Mean MACs per image over ``loader``, from each image's own token counts.

    The model runs as it is (a patched model normally in dynamic mode; static and unpatched work
    too); padding inside a batch is not counted, so the figure is what each image costs alone.

    Args:
        model: A timm ViT, patched or not.
        loader: Batches of images, or ``(images, targets)`` pairs.
        max_images: Stop after this many images.

    Returns:
        ``(mean_macs, kept)`` where ``kept[l]`` is the mean number of tokens (prefix included) that
        block ``l`` passes to its MLP and to the next block.
    """
    g = ViTGeometry.from_model(model)
    patched = is_patched(model)
    if patched and get_mode(model) == "soft":
        raise LTMPError("model: soft mode removes no tokens; switch to 'dynamic' to measure FLOPs")
    device = next(iter(model.parameters())).device
    total, seen = 0.0, 0
    kept = torch.zeros(g.depth, dtype=torch.float64)
    for batch in loader:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if max_images is not None:
            images = images[: max_images - seen]
        if images.shape[0] == 0:
            break
        if patched:
            model(images.to(device))
            total += float(image_macs(model).sum())
            kept += token_counts(model)[1:].double().cpu().sum(dim=1)
        else:
            at = model_geometry(model, tuple(images.shape[-2:]))
            n = at.num_tokens
            total += float(macs_from_counts(at, [n] * (g.depth + 1), _model_layers(model))) * images.shape[0]
            kept += n * images.shape[0]
        seen += images.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if seen == 0:
        raise LTMPError("loader: yielded no images")
    return total / seen, (kept / seen).tolist()


def expected_flops_ratio(model: nn.Module) -> Tensor:
    """Differentiable FLOPs ratio of the last forward pass of a patched model.

    LTMP's budget formula generalised to any op mix, prefix tokens and MLP width: the batch-mean
    token count of every block (sums of the soft-mode masks) through :func:`macs_from_counts`,
    divided by the unreduced cost. With hard masks and one image it is the measured ratio.
    """
    g = _pass_geometry(model)
    counts = token_counts(model).mean(dim=1)
    return macs_from_counts(g, list(counts), get_plan(model).layers) / unreduced_macs(g)


def flops_budget_loss(model: nn.Module, target: float) -> Tensor:
    """LTMP's global budget term ``(target - r_flops)^2`` on the last forward pass."""
    return (target - expected_flops_ratio(model)) ** 2


def kept_fractions(model: nn.Module) -> Tensor:
    """Batch-mean fraction of its input patch tokens each block kept in the last pass: ``[depth]``.

    In soft mode a block's fraction carries the gradient of its own thresholds only
    (:func:`ltmp_core.own_counts`): that it keeps fewer tokens because earlier blocks cut more is not
    its doing.
    """
    n_in = (token_counts(model)[:-1] - model.num_prefix_tokens).detach().clamp_min(1)
    return (own_counts(model) / n_in).mean(dim=1)


def layer_budget_loss(model: nn.Module) -> Tensor:
    """Per-layer budget term: sum over layers of ``(kept fraction - budget)^2`` on the last pass.

    A layer's budget for an image with ``n`` input patch tokens is what it can keep in whole tokens,
    ``kept_count(keep, n) / n`` (:func:`ltmp_core.kept_count`, the rule of static mode and of
    calibration), averaged over the batch; so a layer that is on its budget adds nothing. Each
    layer's term moves only its own thresholds (see :func:`kept_fractions`).
    """
    kept = kept_fractions(model)
    n_in = (token_counts(model)[:-1] - model.num_prefix_tokens).detach().clamp_min(1)
    keep = torch.tensor(get_plan(model).keeps, dtype=kept.dtype, device=kept.device).unsqueeze(1)
    budget = (kept_count(keep, n_in) / n_in).mean(dim=1)
    return ((kept - budget) ** 2).sum()


#: The accepted window of a solved shift: its ratio at most the target and within this share (relative) of it.
WINDOW = 2e-3


def _root(ratio: Callable[[float], float], feasible: float, r_feasible: float, other: float, r_other: float,
          flops: float, *, tolerance: float = WINDOW, steps: int = 24) -> float:
    """A shift whose ratio is at most ``flops`` and within ``tolerance`` (relative) of it, from a bracket
    (``ratio(feasible) <= flops < ratio(other)``; the ratio falls as the shift moves from ``other`` to ``feasible``).

    Regula falsi towards the middle of the accepted window, with the Illinois rule (a side kept twice has
    its residual halved, so the other side moves too) and a bisection whenever two steps have not halved
    the bracket: on the measured ratio, a step function of the shift that is smooth at the scale of a
    batch's tokens, this lands in the window in fewer evaluations than bisection (about 10 against 13 on the
    proxies' shapes, docs/benchmarks.md), and needs at most three evaluations per halving. Stops after
    ``steps`` evaluations, or when the bracket is narrower than 1e-6, at the best feasible shift found."""
    goal = flops * (1.0 - 0.5 * tolerance)
    f_feasible, f_other = r_feasible - goal, r_other - goal
    kept = None  # the side kept by the last step
    width_two_ago = width = abs(other - feasible)
    for i in range(steps):
        if flops - r_feasible <= tolerance * flops or abs(feasible - other) < 1e-6:
            break
        if i >= 2 and abs(feasible - other) > 0.5 * width_two_ago:
            mid = 0.5 * (feasible + other)  # interpolation stalls: halve the bracket
        else:
            mid = feasible - f_feasible * (other - feasible) / (f_other - f_feasible)
            if not min(feasible, other) < mid < max(feasible, other):
                mid = 0.5 * (feasible + other)
        width_two_ago, width = width, abs(feasible - other)
        r = ratio(mid)
        if r <= flops:
            feasible, r_feasible, f_feasible = mid, r, r - goal
            if kept == "other":
                f_other *= 0.5
            kept = "other"
        else:
            other, f_other = mid, r - goal
            if kept == "feasible":
                f_feasible *= 0.5
            kept = "feasible"
    return feasible


def _bracket_near(ratio: Callable[[float], float], flops: float, step: float, most: float, least: float,
                  bounded: bool, tolerance: float = WINDOW) -> tuple[float, float, float | None, float | None]:
    """A bracket around the shift that puts the ratio on ``flops``, found from shift 0 outwards: steps of
    ``step``, doubled each time, towards ``most`` (the shift of the lowest ratio) while the ratio is over the
    target, else towards ``least``. Returns ``(shift, its ratio, other, its ratio)``, ``other`` None when no
    bracket is left to search: ``shift`` is then the answer (0 in the window, or ``least`` under the target),
    or, its ratio over the target, the lowest the search reached (``most``, or unbounded, 2**30 steps out).
    ``tolerance``: the accepted window (relative) under the target that shift 0 may already be in.
    """
    toward_most = 1.0 if most > least else -1.0
    r0 = ratio(0.0)
    if r0 <= flops and flops - r0 <= tolerance * flops:
        return 0.0, r0, None, None
    going = toward_most if r0 > flops else -toward_most
    end = most if r0 > flops else least
    last, r_last, size = 0.0, r0, step
    while True:
        shift = going * size
        clamped = (bounded or end == least) and going * shift >= going * end
        if clamped:
            shift = end
        r = ratio(shift)
        if r0 > flops and r <= flops:
            return shift, r, last, r_last
        if r0 <= flops and r > flops:
            return last, r_last, shift, r
        if clamped or size > 2.0 ** 30:
            return shift, r, None, None
        last, r_last, size = shift, r, 2.0 * size


#: The accepted window (relative) of the first solve of :func:`calibrate_to_flops` with ``coarse``: its
#: answer is only where the solve on every image starts from.
COARSE_WINDOW = 2e-2


@torch.no_grad()
def calibrate_to_flops(model: nn.Module, images: Tensor | Iterable[Any], flops: float, *,
                       solve: str | None = None, near: float | None = None,
                       measure: Callable[[nn.Module], float] | None = None,
                       coarse: int | None = None) -> ReductionPlan:
    """Set the thresholds so that ``images`` cost ``flops`` of the unreduced model, with one shared shift.

    One shift ``s``, common to every threshold of one kind (``solve``: ``merge_threshold``, or
    ``prune_threshold``; by default merge when the plan merges), is found by a bracketing root finder
    (regula falsi with bisection as its safeguard, :func:`_root`) so that the batch's measured FLOPs ratio
    (dynamic mode) is at or just under ``flops``; each such threshold becomes its current value (its
    offset; 0 where it has none) plus ``s``. So a plan without merge thresholds merges, in every merging
    layer, the tokens more similar than one value ``s``: every layer and every image merges as much as it
    is redundant, where :func:`ltmp_core.calibrate` would hold each layer to a budget. Thresholds of the
    other kind must be in the plan and stay as they are. Afterwards every threshold knows its score spread
    (:func:`ltmp_core.measure_scales`). Leaves the model in dynamic mode. Returns :func:`ltmp_core.get_plan`.

    ``near``: the thresholds are near a solution already (tuned with a budget term, or solved for a nearby
    target), so the bracket is searched from shift 0 outwards in doubling steps of ``near`` instead of over
    the whole range of the scores: a model a little over the target is put back on it in a few passes.

    ``measure``: what is solved for instead of the FLOPs ratio, read from the model after each forward of
    the batch (a latency predicted from the token counts the forward left, say); it must fall as the shift
    cuts more, as the FLOPs do, and ``flops`` is then its target.

    ``coarse``: solve on the batch's first ``coarse`` images first, to a window of :data:`COARSE_WINDOW`,
    then on every image from there (``near``, the first step the width of the first solve's last
    bracket): most passes of a solve run on the fewer images, and the answer is solved on all of them to
    the same window as without. A target the fewer images cannot reach is solved on every image as asked.

    Raises:
        Unreachable: ``flops`` cannot be reached by shifting these thresholds (the message says the
            lowest reachable ratio).
        LTMPError: a threshold of the other kind is missing, or ``solve`` names no threshold in use.
    """
    if not (isinstance(flops, (int, float)) and 0 < flops):
        raise LTMPError(f"flops: must be a positive number, got {flops!r}")
    if coarse is not None and not (isinstance(coarse, int) and coarse > 0):
        raise LTMPError(f"coarse: must be a positive number of images, got {coarse!r}")
    if near is not None and not near > 0:
        raise LTMPError(f"near: must be a positive step, got {near!r}")
    layers = get_plan(model).layers  # the thresholds it holds now are the offsets
    uses = {name for layer in layers for name in layer.needs()}
    name = solve or ("merge_threshold" if "merge_threshold" in uses else "prune_threshold")
    if name not in THRESHOLDS:
        raise LTMPError(f"solve: expected one of {', '.join(THRESHOLDS)}, got {name!r}")
    if name not in uses:
        raise LTMPError(f"solve: no layer of the plan uses a {name}")
    for i, layer in enumerate(layers):
        for other in layer.needs():
            if other != name and getattr(layer, other) is None:
                raise LTMPError(f"layers[{i}].{other}: not set; calibrate_to_flops solves the {name}s only")
    offsets = [(getattr(layer, name) or 0.0) if name in layer.needs() else None for layer in layers]
    param = next(iter(model.parameters()))
    x = first_batch(images).to(param.device)
    was_training = model.training
    model.eval()
    try:
        start = offsets
        if coarse is not None and x.shape[0] > coarse:
            try:
                first = _solve_shift(model, name, offsets, x[:coarse], flops, near, measure, COARSE_WINDOW)
            except Unreachable:
                first = None
            if first is not None and first[1] is not None:
                shift, width = first
                start, near = [None if o is None else o + shift for o in offsets], width
        try:
            _solve_shift(model, name, start, x, flops, near, measure, WINDOW)
        except Unreachable:
            set_thresholds(model, name, offsets)  # as they were before the first solve too
            raise
        measure_scales(model, x)
    finally:
        model.train(was_training)
    return get_plan(model)


def _solve_shift(model: nn.Module, name: str, offsets: list[float | None], x: Tensor, flops: float,
                 near: float | None, measure: Callable[[nn.Module], float] | None,
                 tolerance: float) -> tuple[float, float | None]:
    """:func:`calibrate_to_flops` on the batch ``x`` from thresholds ``offsets``, to a window of ``tolerance``:
    leaves the model at the solved shift and returns it, with the width of the last bracket (from the
    answer to the nearest shift measured over the target, at least 1e-4 of the range searched; None when
    no shift was)."""
    used = [o for o in offsets if o is not None]
    unreduced = unreduced_macs(model_geometry(model, tuple(x.shape[-2:])))  # at the size of these images
    seen: dict[float, float] = {}
    last: list[float | None] = [None]  # the shift the model ran last

    def ratio(shift: float) -> float:
        set_thresholds(model, name, [None if o is None else o + shift for o in offsets])
        set_mode(model, "dynamic")
        model(x)
        seen[shift] = float(image_macs(model).mean()) / unreduced if measure is None else float(measure(model))
        last[0] = shift
        return seen[shift]

    def known(shift: float) -> float:  # a shift's ratio, measured once
        return seen[shift] if shift in seen else ratio(shift)

    def unreachable(lowest: float) -> Unreachable:
        set_thresholds(model, name, offsets)  # as they were: a caller may retry from them
        what = "a FLOPs ratio" if measure is None else "a measured value"
        return Unreachable(f"flops: {what} of {flops:.3f} cannot be reached by shifting the {name}s "
                           f"(the lowest reachable on these images is {lowest:.3f})", lowest)

    merges = name == "merge_threshold"
    if merges:  # cosine similarities: below -1 everything merges, above 1 nothing does
        most, least = -1.0 - max(used) - 1e-3, 1.0 - min(used) + 1e-3
    else:  # importance >= 0: at 0 nothing is pruned; raise the shift until the target is met
        least, most = -max(used), 1.0 - min(used)
    if near is not None:
        feasible, r_feasible, other, r_other = _bracket_near(ratio, flops, near, most, least, merges, tolerance)
        if r_feasible > flops:
            raise unreachable(r_feasible)
        if other is not None:
            feasible = _root(ratio, feasible, r_feasible, other, r_other, flops, tolerance=tolerance)
    else:
        if not merges:
            step = 1.0  # the shift grows by doubling steps (whatever sign the offsets give ``most``)
            while ratio(most) > flops and most - least < 2.0 ** 30:
                least, most, step = most, most + step, 2.0 * step
        lowest = known(most)
        if lowest > flops:
            raise unreachable(lowest)
        r_least = known(least)
        feasible = least if r_least <= flops else _root(ratio, most, lowest, least, r_least, flops,
                                                        tolerance=tolerance)
    if last[0] != feasible:
        ratio(feasible)  # leaves the model at the solved shift, as it ran
    over = [abs(shift - feasible) for shift, r in seen.items() if r > flops]
    return feasible, (max(min(over), 1e-4 * abs(most - least)) if over else None)
