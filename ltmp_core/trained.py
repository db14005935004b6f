"""A trained model in one file: its weights and its plan (with the learned thresholds) together.

``search train`` writes ``model.safetensors``: the weights of the stock timm model (what
``timm.create_model(...).load_state_dict`` takes; the thresholds are not among them) and, in the
file's metadata, the plan the model was trained with and facts about the run. Any safetensors reader
opens it; :func:`load_trained` turns it back into a patched model in one call::

    import ltmp_core
    model = ltmp_core.load_trained("out/model.safetensors", mode="static")   # timm model + plan

A plan that cuts width (fewer heads or MLP units) was trained on a model cut to it; the file holds the
cut weights, and :func:`load_trained` cuts a stock model to the plan's widths before loading them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import LTMPError
from .files import state_dict_mismatch, write_atomic
from .patch import THRESHOLDS, apply_plan, get_plan, is_patched
from .plan import ReductionPlan
from .width import prune_width

__all__ = ["TRAINED_FORMAT", "save_trained", "read_trained", "load_trained"]

#: The ``format`` entry of a trained file's metadata.
TRAINED_FORMAT = "ltmp-trained"


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stock model's weights: every entry of the state dict but the learned thresholds."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] not in THRESHOLDS}


def save_trained(model: nn.Module, path: str | os.PathLike[str], *, plan: ReductionPlan | None = None,
                 facts: Mapping[str, Any] | None = None) -> Path:
    """Write a patched model's weights and plan to ``path`` (safetensors), atomically.

    Args:
        model: A patched model (:func:`apply_plan`).
        plan: The plan to embed; default :func:`get_plan` (the thresholds the model holds now).
        facts: JSON-serialisable facts about the run, kept in the metadata under ``facts``.
    """
    from safetensors.torch import save_file

    if plan is None:
        if not is_patched(model):
            raise LTMPError("model: not patched; apply a plan first or pass plan=")
        plan = get_plan(model)
    metadata = {"format": TRAINED_FORMAT, "version": "1", "plan": json.dumps(plan.to_dict(), allow_nan=False),
                "facts": json.dumps(dict(facts or {}), allow_nan=False, default=str)}
    weights = _weights(model)
    return write_atomic(path, lambda tmp: save_file(weights, tmp, metadata=metadata))


def read_trained(path: str | os.PathLike[str], *, weights: bool = True
                 ) -> tuple[dict[str, torch.Tensor] | None, ReductionPlan, dict[str, Any]]:
    """``(weights, plan, facts)`` of a file written by :func:`save_trained` (``weights=False``: the
    metadata only, without reading the tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LTMPError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if weights else None
    except Exception as e:  # not a safetensors file, or a damaged one
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LTMPError(f"{path}: cannot read safetensors ({reason})") from None
    if metadata.get("format") != TRAINED_FORMAT:
        raise LTMPError(f"{path}: holds no plan (not written by search train / ltmp_core.save_trained)")
    try:
        plan = ReductionPlan.from_dict(json.loads(metadata["plan"]))
        facts = json.loads(metadata.get("facts") or "{}")
    except (KeyError, json.JSONDecodeError) as e:
        raise LTMPError(f"{path}: damaged metadata ({e})") from None
    except LTMPError as e:
        raise LTMPError(f"{path}: {e}") from None
    return state, plan, facts


def load_trained(path: str | os.PathLike[str], model: nn.Module | None = None, *, mode: str = "dynamic",
                 **create_kwargs: Any) -> nn.Module:
    """Weights and plan of a trained file applied to ``model`` (a stock timm ViT of the same
    architecture), or to a new ``timm.create_model`` of the plan's model (``create_kwargs`` are passed
    to it; the number of classes and the input size come from the plan). A plan that cuts width cuts
    the model to its widths first (the file's weights are the cut ones). Returns the patched model
    in ``mode`` (``dynamic``: the learned thresholds decide per image; ``static``: fixed counts)."""
    state, plan, facts = read_trained(path)
    if model is None:
        import timm

        if not plan.model or not timm.is_model(plan.model):
            raise LTMPError(f"{path}: model {plan.model!r} is not a timm model here; create it and pass model=")
        kwargs = dict(facts.get("model_kwargs") or {})
        if plan.geometry is not None:
            kwargs.update(num_classes=plan.geometry.num_classes, img_size=plan.geometry.img_size[0])
        model = timm.create_model(plan.model, pretrained=False, **{**kwargs, **create_kwargs})
    if is_patched(model):
        raise LTMPError("model: already carries a plan; pass a stock timm model")
    if plan.cuts_width:
        prune_width(model, plan)  # the shapes the weights were saved at; their values come next
    mismatch = state_dict_mismatch(model, state)
    if mismatch:
        raise LTMPError(f"{path}: the weights do not fit {type(model).__name__} ({mismatch})")
    model.load_state_dict(state)
    model.eval()
    return apply_plan(model, plan, mode=mode)
