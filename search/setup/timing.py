"""Timing models side by side: a plan's time over its unreduced model's, measured in one process.

The models alternate (one ``torch.utils.benchmark.Timer.blocked_autorange`` block each, in turn),
so that load on a shared machine hits them alike; the ratio of every repeat is taken within that
repeat, and the median over the repeats is the answer. ``Timer`` keeps the thread count of this
process (``num_threads``) and synchronises CUDA around its blocks.
"""

from __future__ import annotations

import itertools
import platform
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

from ltmp_core import LTMPError

__all__ = ["check_timeable", "device_fingerprint", "time_block", "time_interleaved", "time_beside", "ratios_beside",
           "latency_ratio", "Ratio"]


def check_timeable(device: torch.device, where: str = "--device") -> None:
    """An error naming ``where`` unless ``device`` is one this module can time (the CPU, or CUDA that is there)."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LTMPError(f"{where}: {device} cannot be timed here (no CUDA device); a latency budget is measured on "
                            "the device it is for")
        return
    raise LTMPError(f"{where}: {device} cannot be timed (latency budgets are measured on cpu or cuda)")


def device_fingerprint(device: torch.device) -> str:
    """What makes timings of one machine comparable with another's: the processor (CPU model and torch's
    thread count, or the CUDA device's name and capability) and the torch version."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        chip = f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    else:
        chip = f"{_cpu_model()} x{torch.get_num_threads()} threads"
    return f"{chip} | torch {torch.__version__.split('+')[0]}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def time_block(run: Callable[[], Any], min_run_time: float) -> float:
    """Seconds per call of ``run``: one untimed call (to warm it after whatever ran before), then one
    ``Timer.blocked_autorange`` block of about ``min_run_time`` seconds (its median)."""
    run()
    timer = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_interleaved(runners: Sequence[Callable[[], Any]], *, repeats: int = 3,
                     min_run_time: float = 0.2) -> list[list[float]]:
    """Seconds per call of every runner, one list per runner with one median per repeat.

    In every repeat the runners take turns, each timed by :func:`time_block` for about ``min_run_time``
    seconds.
    """
    out: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, run in enumerate(runners):
            out[i].append(time_block(run, min_run_time))
    return out


def time_beside(anchor: Callable[[], Any], runners: Sequence[Callable[[], Any]], *, repeats: int = 3,
                min_run_time: float = 0.2) -> tuple[list[list[float]], list[list[float]]]:
    """Every runner timed between two timings of ``anchor``, in every repeat: ``anchor, runner 0, anchor,
    runner 1, ..., anchor``. Returns the anchor's seconds per call (one list per repeat, one more than
    there are runners) and every runner's (one list per runner, one per repeat); :func:`ratios_beside`
    reads them as ratios.

    Many runners timed against one timing of the anchor share its error: when load makes that block fast
    or slow, every ratio of the repeat moves with it. Here every runner has anchors of its own, straight
    before and after it, which load hits as it hits the runner (a load that drifts steadily cancels).
    """
    anchors: list[list[float]] = []
    out: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        row = [time_block(anchor, min_run_time)]
        for i, run in enumerate(runners):
            out[i].append(time_block(run, min_run_time))
            row.append(time_block(anchor, min_run_time))
        anchors.append(row)
    return anchors, out


def ratios_beside(anchors: Sequence[Sequence[float]], times: Sequence[Sequence[float]]) -> list[list[float]]:
    """Every runner's time over the mean of the anchor's timings straight before and after it, per repeat
    (``anchors`` and ``times`` as :func:`time_beside` returns them)."""
    return [[t / ((row[i] + row[i + 1]) / 2) for t, row in zip(runner, anchors)] for i, runner in enumerate(times)]


@dataclass(frozen=True)
class Ratio:
    """A measured latency ratio.

    Attributes:
        ratio: Median over the repeats of (plan's time / unreduced model's time) within each repeat.
        spread: Half the range of the per-repeat ratios (the noise of this measurement).
        base_s: Median seconds per batch of the unreduced model.
        plan_s: Median seconds per batch of the plan.
    """

    ratio: float
    spread: float
    base_s: float
    plan_s: float
    #: The repeats' own times, so that measurements of one plan can be pooled (:meth:`pooled`).
    base_times: tuple[float, ...] = ()
    plan_times: tuple[float, ...] = ()

    @classmethod
    def of(cls, base_t: Sequence[float], plan_t: Sequence[float]) -> Ratio:
        """The ratio of paired repeats (``plan_t[i]`` timed beside ``base_t[i]``)."""
        ratios = [p / b for p, b in zip(plan_t, base_t)]
        return cls(statistics.median(ratios), (max(ratios) - min(ratios)) / 2, statistics.median(base_t),
                   statistics.median(plan_t), tuple(base_t), tuple(plan_t))

    def pooled(self, other: Ratio) -> Ratio:
        """One measurement from the repeats of both (the median over all of them)."""
        return Ratio.of(self.base_times + other.base_times, self.plan_times + other.plan_times)

    @property
    def repeats(self) -> int:
        return len(self.plan_times)

    def to_dict(self) -> dict[str, float]:
        return {"ratio": self.ratio, "spread": self.spread, "base_s": self.base_s, "plan_s": self.plan_s}


def latency_ratio(base: nn.Module, reduced: nn.Module, images: torch.Tensor | Sequence[torch.Tensor], *,
                  repeats: int = 3, min_run_time: float = 0.2) -> Ratio:
    """The time of ``reduced`` over ``base`` on ``images``, interleaved (:func:`time_interleaved`): one batch,
    or several that every call takes in turn (a dynamic plan's time depends on the images)."""
    batches = [images] if isinstance(images, torch.Tensor) else list(images)

    def call(model: nn.Module) -> Callable[[], Any]:
        turn = itertools.cycle(batches)

        def run() -> Any:
            with torch.inference_mode():
                return model(next(turn))
        return run

    base_t, plan_t = time_interleaved([call(base.eval()), call(reduced.eval())], repeats=repeats,
                                      min_run_time=min_run_time)
    return Ratio.of(base_t, plan_t)
