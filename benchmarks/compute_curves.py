"""Accuracy against compute: the search's best-so-far against LTMP trained for longer, on a proxy.

    python benchmarks/compute_curves.py --proxy mnist --flops 0.35 --seed 0 [--epochs 1,2,4,8,16]
        [--n-trials 24] [--json]

Issue 14 compared the search (24 trials) with LTMP's recipe run for one epoch of the proxy's tune
split: 24 steps of 128 images, where LTMP's ImageNet epoch is about 10,000 steps. That margin is an
upper bound. Here both are given more compute and compared where their compute is equal:

- ``search``: one study of ``--n-trials`` trials (the preset: structured space, thresholds solved for
  the target). After its k-th trial, the best trial so far on the select split (at or under the
  target), at the compute of the first k trials, pruned ones included (``forward_equivalents``:
  images through the model or its teacher with each backward pass counted as well,
  :mod:`search.study.compute`).
- ``ltmp``: LTMP's released recipe (its plan, thresholds from 0.9 and 0, SGD at 5e-3 and 5e-6, tau
  0.5, ``10 (r - t)^2``, batch 128) for each number of ``--epochs`` of the tune split, each run from
  the start; the rate stays constant over the run, as within LTMP's one epoch.

Every chosen plan is scored on the test split, which no selection reads. One JSON row per point:
``method``, ``seed``, ``flops_target``, ``trials`` or ``epochs``, ``forward_equivalents``,
``select_top1``, ``test_top1``, ``flops_ratio`` (on test), ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

import ltmp_core
from search.deploy.validate import validate_plan
from search.setup.config import StudyConfig, resolve
from search.study.record import TrialRecord
from search.study.run import run

LTMP_BATCH = 128  # LTMP's released batch size


def _tested(config: StudyConfig, trial: optuna.trial.FrozenTrial) -> dict:
    record = TrialRecord.from_trial(trial)
    plan = ltmp_core.ReductionPlan.from_dict(record.plan)
    return validate_plan(plan, config, split="test", mode=record.eval_mode, name="curve")


def search_curve(config: StudyConfig, url: str, seed: int, flops: float) -> list[dict]:
    """The best trial after each trial of one study, at the compute spent so far."""
    start = time.perf_counter()
    study = run(config, storage=url, study_name=f"search-{flops}-{seed}").study
    seconds = time.perf_counter() - start
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows, spent, best, tested = [], 0, None, {}
    for k, trial in enumerate(trials, 1):
        record = TrialRecord.from_trial(trial)
        spent += record.forward_equivalents or 0
        if trial.state == optuna.trial.TrialState.COMPLETE and record.feasible:
            if best is None or record.accuracy > TrialRecord.from_trial(best).accuracy:
                best = trial
        if best is None:
            continue
        if best.number not in tested:
            tested[best.number] = _tested(config, best)
        test = tested[best.number]
        rows.append({"method": "search", "seed": seed, "flops_target": flops, "trials": k, "best_trial": best.number,
                     "forward_equivalents": spent, "select_top1": TrialRecord.from_trial(best).accuracy,
                     "test_top1": test["top1"], "flops_ratio": test["flops_ratio"],
                     "seconds": round(seconds * k / len(trials), 1)})
    return rows


def ltmp_point(config: StudyConfig, url: str, seed: int, flops: float, epochs: int, tune_images: int) -> dict:
    """LTMP's recipe for ``epochs`` epochs of the tune split, from the start."""
    steps = epochs * math.ceil(tune_images / LTMP_BATCH)
    c = replace(config, space="ltmp", n_trials=1, trial_steps=steps, batch_size=LTMP_BATCH, eval_every=steps + 1)
    start = time.perf_counter()
    study = run(c, storage=url, study_name=f"ltmp-{flops}-{seed}-{epochs}").study
    seconds = time.perf_counter() - start
    trial = study.trials[0]
    record = TrialRecord.from_trial(trial)
    row = {"method": "ltmp", "seed": seed, "flops_target": flops, "epochs": epochs, "steps": steps,
           "forward_equivalents": record.forward_equivalents, "select_top1": record.accuracy,
           "select_flops_ratio": record.flops_ratio, "seconds": round(seconds, 1)}
    if trial.state == optuna.trial.TrialState.COMPLETE:
        test = _tested(c, trial)
        row.update(test_top1=test["top1"], flops_ratio=test["flops_ratio"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", default="mnist", help="the preset whose data and base model are used")
    parser.add_argument("--flops", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-trials", type=int, default=24)
    parser.add_argument("--epochs", default="1,2,4,8,16", help="LTMP's runs, in epochs of the tune split")
    parser.add_argument("--methods", default="search,ltmp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = resolve(args.proxy, {"flops": args.flops, "seed": args.seed, "n_trials": args.n_trials})
    from search.setup.workbench import open_data
    import torch

    tune_images = open_data(config, torch.device("cpu")).tune_size()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'curves.db'}"
        if "search" in args.methods:
            _emit(search_curve(config, url, args.seed, args.flops), args)
        if "ltmp" in args.methods:
            for e in args.epochs.split(","):
                _emit([ltmp_point(config, url, args.seed, args.flops, int(e), tune_images)], args)


def _emit(rows: list[dict], args: argparse.Namespace) -> None:
    for row in rows:
        row["proxy"] = args.proxy
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            size = row.get("trials", row.get("epochs"))
            test = "-" if row.get("test_top1") is None else f"{100 * row['test_top1']:.1f}%"
            print(f"| {row['method']} | {size} | {row['forward_equivalents']} | {100 * (row['select_top1'] or 0):.1f}% "
                  f"| {test} | {row.get('flops_ratio')} |", flush=True)

if __name__ == "__main__":
    main()
