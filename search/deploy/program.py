"""Deployment: a static plan compiled (``torch.compile``), and a trained model exported as a static-mode
``torch.export`` program that needs torch alone.

Static mode keeps a fixed number of tokens in every block (the plan's budgets: for a trained model,
what its thresholds kept on average on the select split), so every shape is known and the program
has no data-dependent control flow. The batch dimension stays symbolic unless asked otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

import ltmp_core
from ltmp_core import LTMPError

__all__ = ["compile_static", "load_trained_model", "export_static"]


#: Graphs of one ``forward`` that a process may compile. Every plan, and every batch size, is a graph of
#: timm's same ``forward`` (the plan's token counts are constants in it); past Dynamo's default limit (8)
#: the models compiled after it would run eager, with one warning in the log and slower figures.
RECOMPILE_LIMIT = 64


def compile_static(model: nn.Module, device: torch.device) -> Any:
    """``torch.compile`` of a model with fixed shapes (a static plan, or a stock model beside one).

    The static path is one graph (no graph breaks, no host syncs), so Inductor fuses the reducers'
    small operations around the GEMMs; on CUDA it also captures CUDA graphs ("reduce-overhead"), which
    removes the launch cost that dominates at batch 1. A new batch size compiles once more. Dynamo's
    recompile limit is raised to :data:`RECOMPILE_LIMIT` (never lowered), so a process that compiles
    several plans or batch sizes compiles each of them.
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


def load_trained_model(path: str | os.PathLike[str], mode: str = "static") -> nn.Module:
    """The model of a ``search train`` output with its plan applied (built-in models included)."""
    import search.setup.models  # noqa: F401  (registers the built-in models with timm)

    return ltmp_core.load_trained(path, mode=mode).eval()


def export_static(path: str | os.PathLike[str], output: str | os.PathLike[str], *, batch_size: int = 2,
                  dynamic_batch: bool = True) -> dict[str, Any]:
    """Export the static-mode model of ``path`` with ``torch.export`` to ``output``, atomically.

    Returns facts about it: the model, its FLOPs ratio, the example batch size and whether other batch
    sizes are allowed.
    """
    model = load_trained_model(path, "static")
    g = ltmp_core.ViTGeometry.from_model(model)
    x = torch.randn(batch_size, 3, *g.img_size)
    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    try:
        with torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # report what torch.export refused, in one line
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LTMPError(f"export-model: torch.export could not trace the static model ({reason})") from None
    ltmp_core.write_atomic(output, lambda tmp: torch.export.save(program, tmp))
    return {"output": str(output), "model": ltmp_core.get_plan(model).model, "batch_size": batch_size,
            "dynamic_batch": dynamic_batch, "flops_ratio": float(ltmp_core.count_flops(model)) /
            ltmp_core.unreduced_macs(g), "img_size": list(g.img_size)}
