"""``search bench``: images/s and latency of a plan against its unreduced model, side by side.

The two models alternate, one timed batch each after the warm-up, so that load on a shared machine
hits both alike; the figures are medians. Inputs are random images of the model's size: in static
mode the cost does not depend on the content; in dynamic mode a plan without learned thresholds is
first calibrated on that batch so that every layer keeps its budget.
"""

from __future__ import annotations

import copy
import datetime
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

import ltmp_core
from ltmp_core import LTMPError, ReductionPlan

from .program import compile_static
from ..setup.evaluation import autocast

__all__ = ["time_batches", "bench_plan", "describe_device", "bench_command"]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def time_batches(runners: list[Callable[[], Any]], device: torch.device, warmup: int, runs: int) -> list[list[float]]:
    """Seconds per call of each runner: ``warmup`` untimed rounds, then ``runs`` timed rounds, interleaved."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in runners]
    for i in range(warmup + runs):
        for j, run in enumerate(runners):
            sync()
            start = time.perf_counter()
            run()
            sync()
            if i >= warmup:
                times[j].append(time.perf_counter() - start)
    return times


def _activation_mb(run: Callable[[], Any], device: torch.device) -> float | None:
    """CUDA memory one call of ``run`` takes at its peak beyond what was allocated before it (weights,
    inputs, CUDA graph pools); None on other devices."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def bench_plan(
    model: nn.Module,
    plan: ReductionPlan,
    *,
    batch_size: int = 32,
    device: torch.device = torch.device("cpu"),
    mode: str = "static",
    amp: bool = False,
    warmup: int = 2,
    runs: int = 7,
    compile: bool = False,
) -> dict[str, Any]:
    """Time the unpatched ``model`` and a patched copy under ``plan``; returns the figures.

    ``speedup`` is images/s of the plan over the model's; ``ideal_fraction`` is the speedup times
    the measured FLOPs ratio (1.0 = as fast as the FLOPs say). On CUDA, ``peak_memory_mb`` is the
    peak over the timed runs of both models, ``activation_mb_base``/``_plan`` what one call of each
    takes beyond the memory already held.
    """
    if mode not in ("static", "dynamic"):
        raise LTMPError(f"mode: expected static or dynamic, got {mode!r}")
    model = model.eval().to(device)
    g = ltmp_core.ViTGeometry.from_model(model)
    x = torch.randn(batch_size, 3, *g.img_size, device=device)
    # A plan that cuts width runs on a copy cut to its widths (by weight magnitude: speed does not depend
    # on which heads and units go).
    reduced = ltmp_core.apply_plan(ltmp_core.prune_width(copy.deepcopy(model), plan), plan, mode="static")
    calibrated = False
    if mode == "dynamic":
        if any(getattr(layer, name) is None for layer in plan.layers for name in layer.needs()):
            ltmp_core.calibrate(reduced, x)
            calibrated = True
        ltmp_core.set_mode(reduced, "dynamic")
    base_run, plan_run = model, reduced
    if compile:
        if mode != "static":
            raise LTMPError("compile: only the static mode has fixed shapes")
        base_run, plan_run = compile_static(model, device), compile_static(reduced, device)

    def call(m: Callable) -> Callable[[], Any]:
        def run() -> Any:
            with autocast(device, amp):
                return m(x)
        return run

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        base_t, plan_t = time_batches([call(base_run), call(plan_run)], device, warmup, runs)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    base_mb, plan_mb = (_activation_mb(call(m), device) for m in (base_run, plan_run))
    macs = float(ltmp_core.image_macs(reduced).mean())
    unreduced = ltmp_core.unreduced_macs(g)
    base, red = statistics.median(base_t), statistics.median(plan_t)
    ratio = macs / unreduced
    return {
        "model": plan.model or type(model).__name__,
        "device": describe_device(device),
        "batch": batch_size,
        "mode": mode,
        "amp": amp,
        "compiled": compile,
        "calibrated_on_random_images": calibrated,
        "gmacs_base": unreduced / 1e9,
        "gmacs_plan": macs / 1e9,
        "flops_ratio": ratio,
        "images_per_s_base": batch_size / base,
        "images_per_s_plan": batch_size / red,
        "latency_ms_base": 1000 * base,
        "latency_ms_plan": 1000 * red,
        "speedup": base / red,
        "ideal_speedup": 1 / ratio,
        "ideal_fraction": base / red * ratio,
        "runs": runs,
        "peak_memory_mb": peak,
        "activation_mb_base": base_mb,
        "activation_mb_plan": plan_mb,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_command(
    plan_path: str | None,
    *,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    flops: float | None = None,
    op: str = "merge+prune",
    importance: str | None = None,
    batch_sizes: list[int],
    modes: list[str],
    device: str = "auto",
    amp: bool | None = None,
    warmup: int = 2,
    runs: int = 7,
    compile: bool = False,
    storage: str | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """``search bench``: an exported plan (or a uniform ``op`` plan at ``flops`` on ``model``) timed
    against its unreduced model at every batch size and mode; every row is stored in the database.

    Returns the plan's label and the rows (``on_row`` sees each as soon as it is measured).
    """
    import timm

    import search.setup.models  # noqa: F401  (registers ltmp_vit_digits)

    from ..setup.config import StudyConfig
    from ..study.storage import resolve_storage
    from ..setup.workbench import runtime
    from ..study.tables import Store

    kwargs = dict(model_kwargs or {})
    if plan_path:
        if str(plan_path).endswith(".safetensors"):  # a model trained by search train: its plan
            plan = ltmp_core.read_trained(plan_path, weights=False)[1]
        else:
            plan = ltmp_core.load_plan(plan_path)
        name = model or plan.model
        if not name:
            raise LTMPError("--model: the plan names no model; give --model")
        label = str(plan_path)
    else:
        if not model or flops is None:
            raise LTMPError("bench: give PLAN.json, or --model and --flops for a quick look")
        importance = importance or StudyConfig().importance[0]  # a study's default
        name, plan, label = model, None, f"{model} {op} ({importance}) at {flops:g}"
    if not timm.is_model(name):
        raise LTMPError(f"--model: unknown timm model {name!r}")
    if plan is not None and plan.geometry is not None:
        kwargs.setdefault("num_classes", plan.geometry.num_classes)
        kwargs.setdefault("img_size", plan.geometry.img_size[0])
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, **kwargs)  # speed does not depend on the weights
    if plan is None:
        g = ltmp_core.ViTGeometry.from_model(net)
        keeps = ltmp_core.budgets_for_ratio([op] * g.depth, [1.0] * g.depth, g, flops)
        plan = ltmp_core.make_plan(net, op=op, keep=keeps, importance=importance, model_name=name)
    dev, use_amp = runtime(device, amp)
    store = Store(resolve_storage(storage), write=True)
    rows = []
    try:
        for mode in modes:
            for batch in batch_sizes:
                row = {"plan": label, **bench_plan(net, plan, batch_size=batch, device=dev, mode=mode, amp=use_amp,
                                                   warmup=warmup, runs=runs, compile=compile)}
                row["id"] = store.add_bench(label, row)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    finally:
        store.dispose()
    return label, rows
