"""The search's best plan against the published baselines on the digits preset, side by side.

    python benchmarks/proxy_search.py [--flops 0.35] [--n-trials 12] [--seed 0]

Every method gets the same per-trial budget (calibration, then `trial_steps` threshold-tuning steps,
scored on the same held-out images in hard mode); the search samples `--n-trials` plans, each
baseline is one fixed plan. Prints a markdown table for docs/benchmarks.md. FLOPs are MACs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from search.config import resolve
from search.results import best_trial
from search.study import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=0.35)
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", default="space", help="budget term of the search: space, layer or global")
    parser.add_argument("--lr", type=float, help="threshold learning rate (default: the preset's)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base_config = resolve("digits", {"flops": args.flops, "seed": args.seed, "lr": args.lr})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'proxy.db'}"
        for space, n in [("layerwise", args.n_trials), ("ltmp", 1), ("tps", 1), ("tome", 1)]:
            config = replace(base_config, space=space, n_trials=n, budget=args.budget if space == "layerwise" else "space")
            start = time.perf_counter()
            result = run(config, storage=url, study_name=f"proxy-{space}")
            seconds = time.perf_counter() - start
            study = result.study
            best = best_trial(study)
            if best is None:  # a baseline that cannot reach the target, or no feasible trial
                trial = next(iter(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))), None)
                reason = study.trials[0].user_attrs.get("pruned_reason", "over the target")
                rows.append((space, n, trial, seconds, f"infeasible: {reason}"))
            else:
                rows.append((space, n, best, seconds, ""))
        base = result.base

    print("| method | trials | held-out top-1 | measured FLOPs ratio | ops per layer | wall time | note |")
    print("|---|---|---|---|---|---|---|")
    print(f"| unreduced | - | {100 * base['evaluated_accuracy']:.1f}% | 1.000 | - | - | |")
    for space, n, trial, seconds, note in rows:
        if trial is None:
            print(f"| {space} | {n} | - | - | - | {seconds:.0f} s | {note} |")
            continue
        ops = " ".join(layer["op"] for layer in trial.user_attrs["plan"]["layers"])
        print(f"| {space} | {n} | {100 * trial.value:.1f}% | {trial.user_attrs['flops_ratio']:.3f} | {ops} "
              f"| {seconds:.0f} s | {note} |")


if __name__ == "__main__":
    main()
