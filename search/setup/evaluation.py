"""Scoring a model: top-1, top-5 and the FLOPs it measured, tokens really removed; and bf16 autocast.

Every command that scores a model (a trial, ``search validate``, ``search train``'s epochs, the
unreduced base) goes through :func:`evaluate`, so the figures mean the same everywhere. Asked for it,
:func:`evaluate` also says which images it got right, in the order of its batches
(:attr:`Evaluation.correct`), so two models scored on the same split can be compared image by image
(a paired bootstrap); :func:`pack_correct` / :func:`unpack_correct` carry that vector in a JSON row.
"""

from __future__ import annotations

import base64
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

import ltmp_core
from ltmp_core import LTMPError

__all__ = ["autocast", "Evaluation", "evaluate", "unreduced_accuracy", "pack_correct", "unpack_correct"]


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` when ``amp``, else nothing."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Evaluation:
    """Held-out figures of a patched model in hard mode."""

    accuracy: float
    top5: float
    images: int
    macs: float  # mean per image
    kept_tokens: list[float]  # mean tokens after each block, prefix included
    seconds: float
    correct: Tensor | None = None  # per image, in batch order (bool, CPU); only when asked (``per_image``)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    amp: bool = False,
    mode: str = "dynamic",
    runner: Callable[[Tensor], Tensor] | None = None,
    per_image: bool = False,
) -> Evaluation:
    """Top-1 accuracy and mean MACs per image with tokens really removed (``mode`` dynamic or static).

    The model's mode and train flag are restored afterwards, so this can run in the middle of tuning.
    ``runner`` calls the model (e.g. a ``torch.compile`` of it); token counts are read from ``model``.
    ``per_image``: also return which images were right (top-1), in the order the batches gave them.
    """
    start = time.perf_counter()
    previous, was_training = ltmp_core.get_mode(model), model.training
    ltmp_core.set_mode(model, mode)
    model.eval()
    correct, correct5, seen, macs = 0, 0, 0, 0.0
    kept: Tensor | None = None
    hits: list[Tensor] = []
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = (model if runner is None else runner)(x)
            right = logits.argmax(dim=-1) == y
            correct += int(right.sum())
            if per_image:
                hits.append(right.cpu())
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct5 += int((top == y.unsqueeze(-1)).any(dim=-1).sum())
            seen += len(y)
            macs += float(ltmp_core.image_macs(model).sum())
            counts = ltmp_core.token_counts(model)[1:].double().sum(dim=1).cpu()
            kept = counts if kept is None else kept + counts
    finally:
        ltmp_core.set_mode(model, previous)
        model.train(was_training)
    if seen == 0:
        raise LTMPError("holdout: no images to evaluate")
    return Evaluation(
        accuracy=correct / seen,
        top5=correct5 / seen,
        images=seen,
        macs=macs / seen,
        kept_tokens=[float(k) / seen for k in kept],
        seconds=time.perf_counter() - start,
        correct=torch.cat(hits) if per_image else None,
    )


def pack_correct(correct: Tensor | np.ndarray) -> str:
    """Per-image correctness as a short ASCII string: the bits packed 8 to a byte (first image in the lowest
    bit of the first byte), base64. 1,000 images take 168 characters."""
    bits = np.packbits(np.asarray(correct, dtype=bool).reshape(-1), bitorder="little")
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(packed: str, images: int) -> np.ndarray:
    """The inverse of :func:`pack_correct`: ``images`` booleans."""
    bits = np.frombuffer(base64.b64decode(packed), dtype=np.uint8)
    if len(bits) != (images + 7) // 8:
        raise LTMPError(f"per-image correctness: {len(bits)} bytes do not hold {images} images")
    return np.unpackbits(bits, count=images, bitorder="little").astype(bool)


@torch.no_grad()
def unreduced_accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, device: torch.device,
                       amp: bool = False) -> tuple[float, float]:
    """Top-1 and top-5 of a model that carries no plan (the unreduced base), in eval mode."""
    model.eval()
    correct = correct5 = seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        correct += int((logits.argmax(dim=-1) == y).sum())
        correct5 += int((logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y.unsqueeze(-1)).any(dim=-1).sum())
        seen += len(y)
    return correct / max(1, seen), correct5 / max(1, seen)
