"""What a trial costs, counted the same way for every trial, whatever became of it.

A study's compute is what its trials ran, including the trials the pruner stopped and those that
failed: comparing a search with a method that runs once is only fair at equal compute. Two figures:

- ``images``: images passed forward through a model (the trial's model or its teacher), every pass
  counted: calibration and threshold solving, tuning steps, the teacher's predictions, the width
  cut's calibration and recovery, the pruner's intermediate scores and the final score.
- ``forward_equivalents``: the same passes in units of one image's forward pass, a backward pass
  added as 1 when only thresholds learn (the weights are frozen, so no weight-gradient products
  are computed: the activation gradients cost about one forward) and as 2 when weights learn (the
  usual "backward = 2 forwards" of the 6N rule). Passes through a reduced model count as a whole
  forward: the figure is an upper bound of the FLOPs, the same for every method at the same ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ComputeMeter"]


@dataclass
class ComputeMeter:
    """Images and forward-equivalents of one trial, added to as the trial runs."""

    images: int = 0
    forward_equivalents: int = 0

    def forward(self, images: int) -> None:
        """``images`` passed forward without gradients (calibration, scoring, a teacher)."""
        self.images += images
        self.forward_equivalents += images

    def threshold_step(self, images: int, *, teacher: bool = False) -> None:
        """One tuning step: forward and backward to the thresholds (weights frozen), and the teacher's
        forward when distilling."""
        self.images += images * (2 if teacher else 1)
        self.forward_equivalents += images * (3 if teacher else 2)

    def weight_step(self, images: int, *, teacher: bool = False) -> None:
        """One step that trains weights: forward and backward with weight gradients, and the teacher's
        forward."""
        self.images += images * (2 if teacher else 1)
        self.forward_equivalents += images * (4 if teacher else 3)
