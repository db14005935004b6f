"""How a study over a range of FLOPs targets covers its range.

    python benchmarks/range_coverage.py [--proxy mnist] [--flops 0.25:0.6] [--n-trials 24]
        [--seeds 0,1,2] [--bin 0.05] [--json]

For each seed, one study of ``--n-trials`` trials over the range (two objectives: select top-1 up,
measured FLOPs ratio down). A row per seed: how many trials were pruned because their target was
out of reach (``pruned_unreachable``; a trial the median pruner stopped, or one whose shape reduces
nothing, is counted apart), the feasible Pareto front (feasible: measured ratio at or under the
trial's own target), and which ``--bin``-wide bins of the range hold a point of that front.
Issue 26's target for ``--flops 0.25:0.6 --n-trials 24``: at most 2 pruned as unreachable and a
front point in each of the seven bins.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.setup.config import resolve
from search.study.record import TrialRecord
from search.study.run import run


def feasible_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (ratio, top-1) points no other point beats: none at most as costly and at least as accurate,
    better in one."""
    return sorted(p for p in points
                  if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points))


def study_row(proxy: str, lo: float, hi: float, n_trials: int, seed: int, width: float, url: str) -> dict:
    config = resolve(proxy, {"flops": hi, "flops_min": lo, "seed": seed, "n_trials": n_trials})
    start = time.perf_counter()
    study = run(config, storage=url, study_name=f"range-{seed}").study
    seconds = time.perf_counter() - start
    trials = study.get_trials(deepcopy=False)
    unreachable = other_pruned = 0
    points, targets = [], []
    for t in trials:
        record = TrialRecord.from_trial(t)
        if record.target is not None:
            targets.append(record.target)
        if t.state == TrialState.PRUNED:
            reason = t.user_attrs.get("pruned_reason", "")
            if "reach" in reason:
                unreachable += 1
            else:
                other_pruned += 1
        elif t.state == TrialState.COMPLETE and record.feasible:
            points.append((record.flops_ratio, record.accuracy))
    front = feasible_front(points)
    bins = math.ceil(round((hi - lo) / width, 6))
    covered = sorted({min(bins - 1, int((r - lo) / width)) for r, _ in front if lo <= r <= hi})
    return {"proxy": proxy, "seed": seed, "flops_range": [lo, hi], "n_trials": len(trials),
            "pruned_unreachable": unreachable, "pruned_other": other_pruned, "feasible": len(points),
            "front": [[round(r, 4), round(a, 4)] for r, a in front], "bins": bins, "bins_covered": covered,
            "targets": sorted(round(x, 4) for x in targets), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", default="mnist")
    parser.add_argument("--flops", default="0.25:0.6")
    parser.add_argument("--n-trials", type=int, default=24)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--bin", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lo, hi = (float(x) for x in args.flops.split(":"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            row = study_row(args.proxy, lo, hi, args.n_trials, seed, args.bin, f"sqlite:///{Path(tmp) / 'r.db'}")
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"seed {seed}: {row['pruned_unreachable']} pruned as unreachable, {row['pruned_other']} other, "
                  f"front {row['front']}, bins {len(row['bins_covered'])}/{row['bins']} {row['bins_covered']}, "
                  f"{row['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
