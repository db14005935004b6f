"""What solving the shared threshold costs a study: per trial forward equivalents and seconds, and what the
study finds (best select top-1, its test top-1), for the default `search run` on a proxy.

Written to compare two versions of the solver (`ltmp_core.calibrate_to_flops`) side by side: it drives the
command line only, so the same script runs in two checkouts. Run it from each, one seed at a time:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/solver_cost.py --proxy mnist --seed 0 --label NAME --json

One JSON row per study: ``label``, ``proxy``, ``seed``, ``flops_target``, ``trials``, ``complete``,
``fe_per_trial`` (mean forward equivalents of the trials that ran a plan), ``s_per_trial`` (mean tuning
seconds: calibration and solving), ``best_select_top1``, ``best_test_top1`` (the exported best plan on the
test split, which no step of the study reads), ``best_flops_ratio``, ``wall_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna


def search(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "search", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr.strip()[-2000:])
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proxy", choices=["mnist", "mnistm"], default="mnist")
    p.add_argument("--flops", type=float, default=0.35)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-trials", type=int, default=24)
    p.add_argument("--label", default="")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 's.db'}"
        start = time.perf_counter()
        result = search("run", "--preset", a.proxy, "--flops", str(a.flops), "--seed", str(a.seed),
                        "--n-trials", str(a.n_trials), "--storage", url, "--study-name", "s", "--quiet")
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name="s", storage=url)
        ran = [t for t in study.trials if t.user_attrs.get("forward_equivalents") and "time_tune_s" in t.user_attrs]
        best = result.get("best") or {}
        test = None
        if best:
            plan = Path(tmp) / "plan.json"
            search("export", "s", "--storage", url, "-o", str(plan))
            test = search("validate", str(plan), "--preset", a.proxy, "--split", "test")["top1"]
    row = {
        "label": a.label, "proxy": a.proxy, "seed": a.seed, "flops_target": a.flops, "trials": len(study.trials),
        "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        "fe_per_trial": statistics.fmean(t.user_attrs["forward_equivalents"] for t in ran) if ran else None,
        "s_per_trial": statistics.fmean(t.user_attrs["time_tune_s"] for t in ran) if ran else None,
        "best_select_top1": best.get("top1"), "best_test_top1": test, "best_flops_ratio": best.get("flops_ratio"),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(row) if a.json else "\n".join(f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
