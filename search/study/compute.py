"""What a trial costs, counted the same way for every trial, whatever became of it.

A study's compute is what its trials ran, including the trials the pruner stopped and those that
failed: comparing a search with a method that runs once is only fair at equal compute. Two figures:

- ``images``: images passed forward through a model (the trial's model or its teacher), every pass
  counted: calibration and threshold solving, tuning steps, the teacher's predictions, the width
  cut's calibration and recovery, the pruner's intermediate scores and the final score.
- ``forward_equivalents``: the same passes in units of one image's forward pass, each backward pass
  counted as two forwards (the usual rule, weight gradients or not: with frozen weights the
  activation gradients alone cost about one forward, so for threshold tuning the figure is an upper
  bound, the same for every method that tunes). Passes through a reduced model count as a whole
  forward: the figure is an upper bound of the FLOPs, the same for every method at the same ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

__all__ = ["ComputeMeter", "count_images"]


@dataclass
class ComputeMeter:
    """Images and forward-equivalents of one trial, added to as the trial runs."""

    images: int = 0
    forward_equivalents: int = 0

    def forward(self, images: int) -> None:
        """``images`` passed forward without gradients (calibration, scoring, a teacher)."""
        self.images += images
        self.forward_equivalents += images

    def step(self, images: int, *, teacher: bool = False) -> None:
        """One training step: forward and backward (thresholds, weights or both), and the teacher's
        forward when distilling."""
        self.images += images * (2 if teacher else 1)
        self.forward_equivalents += images * (4 if teacher else 3)


def count_images(model: nn.Module) -> Callable[[], int]:
    """Count the images ``model`` passes forward from now on (every call's batch, whatever its size: a solve
    may run on part of its batch first): returns a function that tells how many."""
    images = [0]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        batch = args[0] if args else next(iter(kwargs.values()), None)  # the images, by position or by name
        images[0] += int(batch.shape[0]) if hasattr(batch, "shape") and len(batch.shape) else 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def count() -> int:
        handle.remove()
        return images[0]

    return count
