"""Cut the width of a timm ViT: whole attention heads and MLP hidden units, through torch-pruning.

A plan that keeps fewer heads or hidden units in a block (``LayerPlan.heads``, ``mlp_hidden``) is
applied in two steps: :func:`prune_width` removes the weights for good, then :func:`apply_plan` patches
the narrower model for tokens as it patches any other::

    ltmp_core.prune_width(model, plan, images)          # Taylor importance on a calibration batch
    ltmp_core.apply_plan(model, plan, mode="dynamic")

torch-pruning's dependency graph finds what moves together (a head's query, key and value rows of
``qkv``, its columns of ``proj``, its part of a gate or scale-norm; a hidden unit's row of ``fc1``, its
column of ``fc2``, its part of an MLP norm), and its importance criteria rank them:

- ``taylor`` (with images): ``|w * dL/dw|`` summed over the group (first-order Taylor estimate of
  the loss change when the group is removed); the loss is the cross entropy against ``labels``, or
  against the model's own predictions when no labels are given.
- ``magnitude``: the L2 norm of the group's weights (needs no data).
- ``random``: a baseline for measurements.

A head's score is the mean of its channels' scores (as torch-pruning's own head pruning does); each
block keeps exactly the counts of the plan. The result is still a timm ``VisionTransformer`` (its
``Attention`` modules know their new head count) and runs in stock timm. Its state
(:class:`~ltmp_core.geometry.ModelState`, ``model._ltmp``) holds the geometry it was cut from, so
FLOPs ratios stay ratios of the unreduced model; :func:`ltmp_core.apply_plan` carries it over, and
:func:`ltmp_core.remove_plan` drops it but does not restore width: the cut weights are gone.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import LTMPError
from .geometry import STATE, ModelState, ViTGeometry, block_widths, check_model, model_state
from .patch import first_batch, is_patched
from .plan import WIDTH_IMPORTANCE

if TYPE_CHECKING:
    from .plan import ReductionPlan

__all__ = ["prune_width"]

#: Images per forward and backward pass of the Taylor estimate (the gradients add up over chunks).
_CHUNK = 64


def _criterion(name: str):
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    return tp.importance.RandomImportance()


def _graph(model: nn.Module, example: Tensor):
    """torch-pruning's dependency graph of a timm ViT, traced on ``example``.

    Parameters that are not a Linear's, Conv's or LayerNorm's (class and register tokens, position
    embeddings, LayerScale) are handed over as living on their last dimension, the residual width,
    which is never cut. The per-head query and key norms (``qk_norm``) are left out of the trace: a head
    cut leaves their ``head_dim`` channels alone.
    """
    import torch_pruning as tp

    known = (nn.Linear, nn.Conv2d, nn.LayerNorm)
    unwrapped = [(p, p.ndim - 1) for m in model.modules() if not isinstance(m, known)
                 for p in m.parameters(recurse=False)]
    per_head = [n for block in model.blocks for n in (block.attn.q_norm, block.attn.k_norm)
                if not isinstance(n, nn.Identity)]
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, unwrapped_parameters=unwrapped,
                                                     ignored_layers=per_head, verbose=False)


def _taylor_gradients(model: nn.Module, images: Tensor, labels: Tensor | None) -> None:
    """Gradients of the cross entropy on ``images`` in every weight's ``.grad`` (eval mode: no dropout)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for start in range(0, len(images), _CHUNK):
            x = images[start:start + _CHUNK]
            logits = model(x).float()
            y = labels[start:start + _CHUNK] if labels is not None else logits.detach().argmax(dim=-1)
            (F.cross_entropy(logits, y.to(logits.device), reduction="sum") / len(images)).backward()


def prune_width(
    model: nn.Module,
    plan: ReductionPlan,
    images: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    importance: str | None = None,
) -> nn.Module:
    """Remove attention heads and MLP hidden units of a timm ViT in place, to the plan's widths.

    Args:
        model: A stock (unpatched) timm ViT, or one this function cut before (it is cut further).
        plan: Says how many heads (``heads``) and hidden units (``mlp_hidden``) each block keeps.
        images: A calibration batch (or an iterable of batches, of which the first is used) for the
            Taylor criterion; without it the weights' magnitude ranks them.
        labels: Classes of ``images`` for the Taylor criterion (default: the model's own predictions).
        importance: One of :data:`WIDTH_IMPORTANCE` (default: ``taylor`` with images, else ``magnitude``).

    Returns:
        The model, which records the geometry it was cut from (:class:`~ltmp_core.geometry.ModelState`).
        A plan that keeps the model's widths leaves it untouched.

    Raises:
        LTMPError: the model is patched (cut width before :func:`apply_plan`), its MLP is not timm's
            ``Mlp``, the plan is for another geometry, asks for more width than the model has, or
            asks for ``taylor`` without images.
    """
    from timm.layers import Mlp

    check_model(model)
    if is_patched(model):
        raise LTMPError("model: already patched; cut the width first (prune_width), then apply_plan")
    importance = importance or ("taylor" if images is not None else "magnitude")
    if importance not in WIDTH_IMPORTANCE:
        raise LTMPError(f"importance: expected one of {', '.join(WIDTH_IMPORTANCE)}, got {importance!r}")
    if importance == "taylor" and images is None:
        raise LTMPError("importance: 'taylor' needs a calibration batch of images")
    g = ViTGeometry.from_model(model)
    if plan.depth != g.depth:
        raise LTMPError(f"plan: {plan.depth} layers, but the model has {g.depth} blocks")
    if plan.geometry is not None and (plan.geometry.num_heads, plan.geometry.mlp_hidden, plan.geometry.embed_dim) != (
            g.num_heads, g.mlp_hidden, g.embed_dim):
        raise LTMPError(
            f"plan: made for blocks of {plan.geometry.num_heads} heads and {plan.geometry.mlp_hidden} MLP units "
            f"(width {plan.geometry.embed_dim}); the model has {g.num_heads} and {g.mlp_hidden} (width {g.embed_dim})")
    now, wanted = block_widths(model), plan.widths(g)
    for i, ((h, m), (want_h, want_m)) in enumerate(zip(now, wanted)):
        if want_h > h or want_m > m:
            raise LTMPError(f"layers[{i}]: keeps {want_h} heads and {want_m} MLP units; the block has only {h} and {m}")
        if want_m < m and type(model.blocks[i].mlp) is not Mlp:
            raise LTMPError(f"model.blocks[{i}].mlp: {type(model.blocks[i].mlp).__name__} is not timm's Mlp; "
                            "only its hidden units can be cut")
    if now == wanted:
        return model
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise LTMPError(f"model: {type(model).__name__} keeps its width; heads and MLP units are cut in timm "
                        "VisionTransformer blocks only (leave the plan's heads and mlp_hidden unset)")

    import torch_pruning as tp

    param = next(iter(model.parameters()))
    x = None if images is None else first_batch(images).to(param.device)
    example = x[:2] if x is not None else torch.zeros(1, 3, *g.img_size, device=param.device, dtype=param.dtype)
    was_training, grad_flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    try:
        model.requires_grad_(True)  # the graph is traced through autograd
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch-pruning's notes on tracing; the result is checked below
            graph = _graph(model, example)
        if importance == "taylor":
            _taylor_gradients(model, x, labels)
        criterion = _criterion(importance)
        cuts = []
        with torch.no_grad():  # rank everything before anything is removed
            for block, (h, m), (want_h, want_m) in zip(model.blocks, now, wanted):
                attn = block.attn
                heads: list[int] = []
                units: list[int] = []
                if want_h < h:
                    # Rooted at the projection's inputs, one score per channel of the h heads.
                    group = graph.get_pruning_group(attn.proj, tp.prune_linear_in_channels, idxs=list(range(h * attn.head_dim)))
                    score = criterion(group).view(h, attn.head_dim).mean(dim=1)
                    heads = sorted(torch.argsort(score, stable=True)[: h - want_h].tolist())
                if want_m < m:
                    group = graph.get_pruning_group(block.mlp.fc1, tp.prune_linear_out_channels, idxs=list(range(m)))
                    units = sorted(torch.argsort(criterion(group), stable=True)[: m - want_m].tolist())
                cuts.append((heads, units))
        model.zero_grad(set_to_none=True)
        for block, (heads, units) in zip(model.blocks, cuts):
            attn = block.attn
            if heads:
                channels = [head * attn.head_dim + c for head in heads for c in range(attn.head_dim)]
                graph.get_pruning_group(attn.proj, tp.prune_linear_in_channels, idxs=channels).prune()
                attn.num_heads -= len(heads)
                attn.attn_dim = attn.num_heads * attn.head_dim
            if units:
                graph.get_pruning_group(block.mlp.fc1, tp.prune_linear_out_channels, idxs=units).prune()
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if model_state(model) is None:  # a model cut before keeps the geometry of its first cut
        setattr(model, STATE, ModelState(cut_from=g))
    if block_widths(model) != wanted or any(
            b.attn.qkv.out_features != 3 * b.attn.num_heads * b.attn.head_dim
            or b.attn.proj.in_features != b.attn.num_heads * b.attn.head_dim
            for b in model.blocks):
        raise RuntimeError("prune_width: torch-pruning left the blocks at other widths than the plan's")
    return model
