"""How well a latency model predicts plans it never ran (issue 28, item 2).

    python benchmarks/latency_model.py --proxy mnist --batch 1 32 --models 3 --timings 3 [--mode dynamic] [--json]

Per batch size: the latency model of this device is measured ``--models`` times (as a study measures it,
every kind of block the proxy's default search can run); after each, a fixed set of static plans that are
not among its probes is timed for real (plan and unreduced model interleaved in this process,
:func:`search.setup.timing.latency_ratio`, 3 repeats) ``--timings`` times, and the median of those
timings is the plan's measured ratio. One row per model and plan: ``predicted``, ``measured``,
``timings`` (each timing's ratio), ``error`` (predicted over measured, less 1), ``batch``, ``model_run``,
``model_seconds`` (how long measuring the model took).

The plans: merging in every block at keeps 0.6, 0.75, 0.87 and 0.97 (the probes keep 0.8 and 0.93);
merge then prune (``cls`` importance) and squeeze (``mean``) at 0.85; merging from block 3 on at 0.8;
and, on a 12-block model, merge then prune in ToMe's order with the budgets a search chose
(:data:`SEARCHED_KEEPS`).
The spread of ``timings`` is what the machine's noise allows a prediction to be judged by.

``--mode dynamic``: the model is measured for dynamic mode, every plan's thresholds are placed on the
study's calibration images (each block keeps its budget of them, pooled), and the plan is timed on the
images a study's checks time it on (the first select images, every call the next batch) and predicted
from the counts it leaves on them, image by image.

Timing runs with ``--threads`` threads (1 by default, as ``latency_search.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ltmp_core
from search.setup.config import resolve
from search.setup.latency import counts_on, dynamic_kinds, kinds_for, measure_latency_model
from search.setup.timing import device_fingerprint, latency_ratio
from search.setup.workbench import Workbench
from search.study.latency_study import timing_images


#: The budgets of a plan the proxy's default search chose at 0.35 (seed 1 of ``latency_search.py``):
#: steep cuts early, and late blocks whose stages remove one token or none.
SEARCHED_KEEPS = (0.597, 0.755, 0.832, 0.846, 0.954, 0.957, 0.983, 0.988, 0.992, 0.94, 0.991, 0.968)


def plans(base: torch.nn.Module, depth: int) -> dict[str, ltmp_core.ReductionPlan]:
    out = {f"merge {k:g}": ltmp_core.make_plan(base, op="merge", keep=k) for k in (0.6, 0.75, 0.87, 0.97)}
    out["merge+prune/cls 0.85"] = ltmp_core.make_plan(base, op="merge+prune", keep=0.85, importance="cls")
    out["squeeze/mean 0.85"] = ltmp_core.make_plan(base, op="squeeze", keep=0.85, importance="mean")
    out["merge from block 3, 0.8"] = ltmp_core.make_plan(base, op=["none"] * 3 + ["merge"] * (depth - 3), keep=0.8)
    if depth == len(SEARCHED_KEEPS):
        out["merge+prune/mean, tome order, searched"] = ltmp_core.make_plan(
            base, op="merge+prune", keep=list(SEARCHED_KEEPS), importance="mean", merge_order="tome")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", default="mnist")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--models", type=int, default=3, help="latency models measured per batch size")
    parser.add_argument("--timings", type=int, default=3, help="real timings of every plan per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = resolve(args.proxy, {})
    bench = Workbench.open(config)
    g = bench.geometry
    kinds = kinds_for(config.ops, config.importance)
    reduced = {name: (plan, bench.reduced(plan, "static")[0]) for name, plan in plans(bench.base, g.depth).items()}
    if args.mode == "dynamic":
        calibration = bench.data.calibration_batch(config.calib_images).to(bench.device)
        for _, module in reduced.values():
            ltmp_core.calibrate(module, calibration)
            ltmp_core.set_mode(module, "dynamic")
    errors: dict[int, list[float]] = {}
    for batch in args.batch:
        x = timing_images(bench, batch, args.mode)
        # Dynamic mode: the counts every plan's thresholds leave on the images it is timed on.
        counts = {name: counts_on(module, x) for name, (_, module) in reduced.items()} if args.mode == "dynamic" else {}
        for run in range(args.models):
            start = time.perf_counter()
            model = measure_latency_model(bench.base, kinds, batch=batch, mode=args.mode, device=bench.device)
            seconds = time.perf_counter() - start
            for name, (plan, module) in reduced.items():
                timings = [latency_ratio(bench.base, module, x, repeats=3).ratio for _ in range(args.timings)]
                predicted = (model.ratio(plan, g) if args.mode == "static"
                             else model.ratio_of_counts(counts[name], dynamic_kinds(plan)))
                measured = statistics.median(timings)
                row = {"proxy": args.proxy, "batch": batch, "mode": args.mode, "model_run": run, "plan": name,
                       "predicted": predicted,
                       "measured": measured, "timings": timings, "error": predicted / measured - 1,
                       "model_seconds": seconds, "device": device_fingerprint(bench.device),
                       "torch": torch.__version__}
                errors.setdefault(batch, []).append(row["error"])
                print(json.dumps(row) if args.json else
                      f"b{batch} model {run} {name:24s} predicted {predicted:.3f} measured {measured:.3f} "
                      f"({min(timings):.3f}-{max(timings):.3f}) error {100 * row['error']:+.1f}%", flush=True)
    for batch, errs in errors.items():
        within = sum(abs(e) <= 0.10 for e in errs)
        summary = {"batch": batch, "within_10pct": within, "plans": len(errs),
                   "median_abs_error": statistics.median(abs(e) for e in errs), "worst_error": max(errs, key=abs)}
        print(json.dumps(summary) if args.json else
              f"batch {batch}: {within} of {len(errs)} within 10%, median |error| "
              f"{100 * summary['median_abs_error']:.1f}%, worst {100 * summary['worst_error']:+.1f}%")


if __name__ == "__main__":
    main()
