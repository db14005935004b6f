"""Latency as the budget (issue 28): a FLOPs-targeted search against a latency-targeted one at the
same measured latency, on a proxy.

    python benchmarks/latency_search.py --proxy mnist --batch 1 32 --seed 0 1 2 --n-trials 12
        [--mode static|dynamic] [--json]

Per seed, the proxy's default search at ``--flops 0.35`` (one study; its plan does not depend on the
batch). Per seed and batch size: that plan's latency ratio is measured (in ``--mode``, plan and
unreduced model interleaved in this process, median of ``--target-repeats`` repeats, 3 by default;
dynamic mode on the first select images, as a study's checks time it); a study with ``--latency`` at
that ratio (and no FLOPs target; at most 1, the largest ``--latency``) searches a plan as fast. Rows
(one per study and batch):

- ``budget``: ``flops`` or ``latency``; ``target``: its target;
- ``predicted_latency_ratio``: the latency study's model of this device predicts both plans (dynamic
  mode: from the counts each plan leaves on the images it is timed on);
- ``measured_latency_ratio``: as the run measured it (the latency study's checks; the FLOPs plan's
  measurement that set the target);
- ``fresh_latency_ratio``, ``fresh_spread``, ``fresh_feasible``: the plan timed again in a fresh
  process (``--retime``), feasible when at or under the target plus that measurement's spread;
- ``flops_ratio`` and ``test_top1``: the plan scored on the test split in ``--mode`` (the mode its
  latency is for); ``batch``; ``mode``; ``seconds``: the study's wall time (the latency study's includes
  measuring its latency model and the real checks);
- latency rows: ``max_stride`` (the study's ``--stage-stride``, or what the study decided from its latency
  model, with ``stride_predictions``; ``--stage-strides 1 3`` runs one study of each at the same target) and
  ``stage_stride`` (what its best plan runs: every k-th reducing block); ``reaimed_trials`` (what
  ``--latency-reaim`` added), ``reaimed_from`` (where the best plan is one of them: the trial it re-aimed) and
  ``sampled_best``: the best of the sampled trials alone (what the study names with ``--latency-reaim 0``:
  trial, measured latency, FLOPs ratio and test top-1), from the same study.

Timing runs with ``--threads`` threads (1 by default: on a shared 2-core machine two threads wait for
each other under load and a ratio moves by tens of percent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

import ltmp_core
from search.deploy.validate import validate_plan
from search.setup.config import resolve
from search.setup.latency import LatencyModel, counts_on, dynamic_kinds
from search.setup.timing import device_fingerprint, latency_ratio
from search.setup.workbench import Workbench
from search.study.latency_study import timing_images
from search.study.plans import trial_plan
from search.study.record import StudyRecord, TrialRecord
from search.study.results import best_trial, feasible_check, is_added, ranked_trials
from search.study.run import run


def measure(config, plan: ltmp_core.ReductionPlan, batch: int, mode: str, repeats: int = 3) -> dict:
    """The plan's latency ratio at ``batch`` in ``mode``, interleaved with the unreduced model, on the images
    a study's checks time it on (:func:`search.study.latency_study.timing_images`)."""
    bench = Workbench.open(config)
    reduced, _ = bench.reduced(plan, mode)
    return latency_ratio(bench.base, reduced, timing_images(bench, batch, mode), repeats=repeats).to_dict()


def predicted(config, plan: ltmp_core.ReductionPlan, batch: int, mode: str, model: LatencyModel) -> float:
    """``model``'s prediction of ``plan``: static mode from its fixed counts; dynamic mode from the counts its
    thresholds leave on the images it is timed on, image by image."""
    if mode == "static":
        return model.ratio(plan, plan.geometry)
    bench = Workbench.open(config)
    reduced, _ = bench.reduced(plan, mode)
    return model.ratio_of_counts(counts_on(reduced, timing_images(bench, batch, mode)), dynamic_kinds(plan))


def retime_fresh(plan_path: Path, proxy: str, batch: int, threads: int, mode: str) -> dict:
    """:func:`measure` in a new Python process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--retime", str(plan_path), "--proxy", proxy, "--batch", str(batch),
                          "--threads", str(threads), "--mode", mode], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_top1(config, plan: ltmp_core.ReductionPlan, mode: str) -> tuple[float, float]:
    tested = validate_plan(plan, config, split="test", mode=mode, name="plan")
    return tested["top1"], tested["flops_ratio"]


def row_for(budget: str, target: float, study: optuna.Study, config, batch: int, seconds: float,
            model: LatencyModel, measured: float | None, folder: Path, proxy: str, threads: int, mode: str,
            best: optuna.trial.FrozenTrial | None = None) -> dict:
    best = best or best_trial(study)
    row = {"proxy": proxy, "budget": budget, "target": target, "batch": batch, "mode": mode, "seed": config.seed,
           "study": study.study_name, "seconds": seconds, "device": model.fingerprint, "torch": torch.__version__}
    if best is None:
        return {**row, "feasible_trial": False}
    plan, _ = trial_plan(study, best.number)
    path = ltmp_core.save_plan(plan, folder / f"{study.study_name}-b{batch}-t{best.number}.json")
    top1, flops = test_top1(config, plan, mode)
    fresh = retime_fresh(path, proxy, batch, threads, mode)
    row.update(feasible_trial=True, trial=best.number, ops=" ".join(plan.ops),
               predicted_latency_ratio=predicted(config, plan, batch, mode, model), measured_latency_ratio=measured,
               fresh_latency_ratio=fresh["ratio"], fresh_spread=fresh["spread"],
               fresh_feasible=fresh["ratio"] <= target + fresh["spread"], flops_ratio=flops, test_top1=top1)
    if row["measured_latency_ratio"] is not None:
        row["prediction_error"] = row["predicted_latency_ratio"] / row["measured_latency_ratio"] - 1
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", default="mnist")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--flops", type=float, default=0.35)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static",
                        help="the mode plans are timed and scored in (the latency studies' --latency-mode)")
    parser.add_argument("--target-repeats", type=int, default=3,
                        help="interleaved repeats of the timing of the FLOPs plan that sets the latency target")
    parser.add_argument("--stage-strides", type=int, nargs="+", metavar="K",
                        help="one latency study per value, each with that --stage-stride (default: one study with "
                             "the default: decided by the latency model); their rows carry max_stride")
    parser.add_argument("--storage", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--retime", metavar="PLAN.json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.retime:
        plan = ltmp_core.load_plan(args.retime)
        print(json.dumps(measure(resolve(args.proxy, {}), plan, args.batch[0], args.mode)))
        return
    folder = Path(tempfile.mkdtemp(prefix="latency_search-"))
    url = args.storage or f"sqlite:///{folder / 'studies.db'}"
    for seed in args.seed:
        flops_config = resolve(args.proxy, {"flops": args.flops, "seed": seed, "n_trials": args.n_trials})
        start = time.perf_counter()
        flops_study = run(flops_config, storage=url, study_name=f"flops{args.flops:g}-s{seed}").study
        flops_seconds = time.perf_counter() - start
        best = best_trial(flops_study)
        if best is None:
            print(json.dumps({"seed": seed, "budget": "flops", "feasible_trial": False}))
            continue
        flops_plan, _ = trial_plan(flops_study, best.number)
        for batch in args.batch:
            target = measure(flops_config, flops_plan, batch, args.mode, args.target_repeats)["ratio"]
            flops_row = None
            for stride in args.stage_strides or [None]:
                overrides = {} if stride is None else {"stage_stride": stride}
                lat_config = resolve(args.proxy, {"latency": min(1.0, target), "latency_batch": batch, "seed": seed,
                                                  "latency_mode": args.mode, "n_trials": args.n_trials, **overrides})
                name = f"latency-s{seed}-b{batch}" + ("" if stride is None else f"-k{stride}")
                start = time.perf_counter()
                result = run(lat_config, storage=url, study_name=name)
                lat_seconds = time.perf_counter() - start
                record = StudyRecord.from_study(result.study)
                model = LatencyModel.from_dict(next(m for m in record.latency_models.values()
                                                    if m["batch"] == batch and m["mode"] == args.mode))
                lat_best = best_trial(result.study)
                rows = []
                if flops_row is None:  # predicted by the first latency study's model
                    flops_row = row_for("flops", args.flops, flops_study, flops_config, batch, flops_seconds, model,
                                        target, folder, args.proxy, args.threads, args.mode)
                    flops_row.update(latency_target_of="its own measured latency", target_repeats=args.target_repeats)
                    rows.append(flops_row)
                lat_row = row_for("latency", target, result.study, lat_config, batch, lat_seconds, model,
                                  None if lat_best is None else record.measured_latency().get(lat_best.number), folder,
                                  args.proxy, args.threads, args.mode)
                # A FLOPs plan slower than the unreduced model (batch 1) asks for a ratio above 1: the latency
                # study then searches at 1 (no slower than unreduced), the most --latency accepts.
                lat_row.update(target=lat_config.latency, requested_target=target,
                               max_stride=record.stage_stride or lat_config.stage_stride or 1,
                               stride_predictions=record.stride_predictions, latency_checks=record.latency_checks)
                if lat_best is not None:
                    lat_row["stage_stride"] = lat_best.params.get("stage_stride", 1)
                lat_row["reaimed_trials"] = result.reaimed
                if lat_best is not None and TrialRecord.from_trial(lat_best).reaimed_from is not None:
                    lat_row["reaimed_from"] = TrialRecord.from_trial(lat_best).reaimed_from
                    feasible = feasible_check(result.study)
                    sampled = next((t for t in ranked_trials(result.study) if not is_added(t) and feasible(t)), None)
                    if sampled is not None:
                        alone = row_for("latency", target, result.study, lat_config, batch, 0.0, model,
                                        record.measured_latency().get(sampled.number), folder, args.proxy,
                                        args.threads, args.mode, best=sampled)
                        lat_row["sampled_best"] = {k: alone.get(k) for k in (
                            "trial", "measured_latency_ratio", "fresh_latency_ratio", "flops_ratio", "test_top1")}
                rows.append(lat_row)
                for row in rows:
                    print(json.dumps(row) if args.json else
                          f"seed {seed} b{batch} {row['budget']:7s} target {row['target']:.3f}"
                          f"{' k<=' + str(row['max_stride']) if 'max_stride' in row else ''}: "
                          f"pred {row.get('predicted_latency_ratio', float('nan')):.3f} "
                          f"meas {row.get('measured_latency_ratio') or float('nan'):.3f} "
                          f"fresh {row.get('fresh_latency_ratio', float('nan')):.3f} "
                          f"FLOPs {row.get('flops_ratio', float('nan')):.3f} test {row.get('test_top1', float('nan')):.4f} "
                          f"{row['seconds']:.0f}s", flush=True)
    print(json.dumps({"device": device_fingerprint(torch.device("cpu")), "storage": url}) if args.json
          else f"studies in {url}", file=sys.stderr)


if __name__ == "__main__":
    main()
