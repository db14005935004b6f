"""The FLOPs budget: the target a user asks for, the margin plans aim under it, and that aim.

One value from the command line to the database and back: a study builds it from its configuration
(``--flops``, ``--flops-margin``), every trial records it in its plan (``plan.meta``), ``search export``
keeps it there, and ``search train`` and ``search validate`` read it back from the plan, so a study
run with ``--flops-margin 0.05`` is trained towards its own aim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ltmp_core import LTMPError

__all__ = ["Budget", "DEFAULT_MARGIN", "RESOLVE_STEP", "check_ratio"]

#: Plans aim this fraction under the target: the images a plan runs on cost more or less than the
#: batch its thresholds were set on.
DEFAULT_MARGIN = 0.02

#: First step of the shared shift when thresholds that are near a solution already (tuned, trained, or
#: solved for a nearby target) are put back on the aim (``ltmp_core.calibrate_to_flops(near=...)``): on the
#: MNIST proxy's trained thresholds it takes 2-13 passes where a solve over the whole range takes 17-25.
RESOLVE_STEP = 1e-2

#: Calibration images a solve of the shared shift runs on first, to a coarse window, before it solves on
#: them all from there (``ltmp_core.calibrate_to_flops(coarse=...)``): a trial's solve, a latency solve, the
#: re-solve after tuning and ``search train``'s final shift. On the proxies' default studies a trial then
#: forwards about 31% fewer images (docs/benchmarks.md, "Solving on 64 images first").
COARSE_IMAGES = 64

#: Keys of the budget in ``plan.meta`` (and in the JSON outputs of the commands).
TARGET_KEY, MARGIN_KEY, AIM_KEY = "target_flops_ratio", "flops_margin", "aim"


def check_ratio(value: Any, where: str = "--flops", noun: str = "FLOPs ratio") -> float:
    """``value`` as a ratio (FLOPs, or ``noun``) in (0, 1]; an error naming ``where`` otherwise."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise LTMPError(f"{where}: expected a {noun} in (0, 1], got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise LTMPError(f"{where}: the target {noun} must be in (0, 1], got {value!r}")
    return ratio


def check_margin(value: Any, where: str = "--flops-margin") -> float:
    """``value`` as a margin in [0, 0.5)."""
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise LTMPError(f"{where}: expected a number in [0, 0.5), got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(margin) and 0.0 <= margin < 0.5):
        raise LTMPError(f"{where}: must be in [0, 0.5), got {value!r}")
    return margin


@dataclass(frozen=True)
class Budget:
    """A FLOPs target and the margin under it.

    Attributes:
        target: The measured FLOPs ratio a plan must stay at or under (the constraint of a trial).
        margin: The fraction under the target that plans aim at.
    """

    target: float
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", check_ratio(self.target))
        object.__setattr__(self, "margin", check_margin(self.margin))

    @property
    def aim(self) -> float:
        """The ratio plans are calibrated and trained towards: ``target * (1 - margin)``."""
        return self.target * (1.0 - self.margin)

    def to_meta(self) -> dict[str, float]:
        """The budget as ``plan.meta`` and the commands' JSON carry it."""
        return {TARGET_KEY: self.target, MARGIN_KEY: self.margin, AIM_KEY: self.aim}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], *, target: float | None = None,
                  margin: float | None = None) -> "Budget | None":
        """The budget a plan records, with ``target`` or ``margin`` given by the user instead where not
        ``None``; ``None`` when neither the plan nor the user names a target. Plans of versions before
        the margin was recorded aimed :data:`DEFAULT_MARGIN` under their target."""
        chosen = target if target is not None else meta.get(TARGET_KEY)
        if chosen is None:
            return None
        return cls(chosen, margin if margin is not None else meta.get(MARGIN_KEY, DEFAULT_MARGIN))
