"""Does a trial rank width cuts as training would? Scores before and after `search train --recipe full`.

A `joint` trial cuts width (torch-pruning, Taylor importance) and scores the plan at once; the plan is
then trained. If width cuts lose more before training than they keep losing after it, the trial's
score ranks them unfairly against token cuts, and a short recovery in the trial may help. This script
takes a grid of width profiles, each with LTMP's token shape (merge+prune in every block) and its
merge threshold solved on the width-cut model for the target, and for each reports:

- the select top-1 as a trial scores it, with ``--width-recovery`` 0 and with R steps;
- the select and test top-1 after ``search train --recipe full --epochs E`` (same budget for all);

then the Spearman rank correlation of each trial score with the trained select and test scores.

    python benchmarks/width_ranking.py --flops 0.35 --epochs 4 --recovery 30 --json >> docs/data/width_ranking.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch

import ltmp_core
from search.setup.config import TrainSettings, resolve
from search.setup.evaluation import evaluate
from search.setup.models import load_base_model
from search.setup.workbench import open_data
from search.train.loop import train
from search.setup.width import cut_width, width_cut_for
from spaces import suggest

#: (mlp_keep, heads_keep): full width, MLP cuts, head cuts and both.
GRID = [(1.0, 1.0), (0.75, 1.0), (0.5, 1.0), (0.3, 1.0), (1.0, 0.75), (0.75, 0.75), (0.5, 0.75), (1.0, 0.5)]


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(v):  # ties share their mean rank
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flops", type=float, default=0.35)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--recovery", type=int, default=30, help="recovery steps of the second trial score")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cpu = torch.device("cpu")
    config = resolve("mnist", {"flops": a.flops, "seed": a.seed, "space": "joint"})
    data = open_data(config, cpu)
    base, _ = load_base_model(config.model, data, img_size=config.img_size, base_epochs=config.base_epochs)
    g = ltmp_core.ViTGeometry.from_model(base)
    aim = a.flops * (1 - config.flops_margin)
    calibration = data.calibration_batch(config.calib_images, config.seed)
    shape = {"merge": True, "merge_from": 0, "merge_to": g.depth, "slope": 0.0, "order": "tome", "prune": "prune",
             "prune_from": 0, "prune_level": 1e-3, "host": "keys", "importance": "mean"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mlp_keep, heads_keep in GRID:
            params = {**shape, "mlp_keep": mlp_keep, "mlp_tilt": 0.0, "heads_keep": heads_keep, "heads_tilt": 0.0}
            plan = suggest("joint", optuna.trial.FixedTrial(params), g, aim, ops=config.ops, importance=("mean",))
            plan = replace(plan, model=config.model)
            widths = plan.widths()
            width_only = ltmp_core.make_plan(g, op="none", heads=[h for h, _ in widths], mlp_hidden=[m for _, m in widths])
            row = {"flops": a.flops, "seed": a.seed, "mlp_keep": mlp_keep, "heads_keep": heads_keep,
                   "width_flops_ratio": ltmp_core.plan_flops_ratio(width_only)}
            for steps in (0, a.recovery):
                start = time.perf_counter()
                model = copy.deepcopy(base)
                cut = replace(width_cut_for(config), recover_steps=steps)
                cut_plan = cut_width(model, plan, data, cut, device=cpu, teacher=base)
                ltmp_core.apply_plan(model, cut_plan, mode="static")
                ltmp_core.calibrate_to_flops(model, calibration, aim)
                ev = evaluate(model, data.holdout_batches(config.batch_size), device=cpu)
                row[f"trial_top1_r{steps}"] = ev.accuracy
                row[f"trial_ratio_r{steps}"] = ev.macs / ltmp_core.unreduced_macs(g)
                row[f"trial_seconds_r{steps}"] = round(time.perf_counter() - start, 1)
                if steps == 0:
                    solved = ltmp_core.get_plan(model)
                    solved = replace(solved, meta={**solved.meta, "target_flops_ratio": a.flops})
            path = Path(tmp) / f"plan-{mlp_keep}-{heads_keep}.json"
            ltmp_core.save_plan(solved, path)
            start = time.perf_counter()
            result = train(str(path), config, TrainSettings(recipe="full", epochs=a.epochs, seed=a.seed),
                           Path(tmp) / f"out-{mlp_keep}-{heads_keep}")
            row.update(trained_select_top1=result.final["select_top1"], trained_test_top1=result.final["test_top1"],
                       trained_test_ratio=result.final["test_flops_ratio"], epochs=a.epochs,
                       train_seconds=round(time.perf_counter() - start, 1))
            rows.append(row)
            print(json.dumps(row) if a.json else row, flush=True)
    summary = {"flops": a.flops, "seed": a.seed, "epochs": a.epochs, "recovery": a.recovery}
    for steps in (0, a.recovery):
        trial = [r[f"trial_top1_r{steps}"] for r in rows]
        summary[f"spearman_r{steps}_vs_trained_select"] = spearman(trial, [r["trained_select_top1"] for r in rows])
        summary[f"spearman_r{steps}_vs_trained_test"] = spearman(trial, [r["trained_test_top1"] for r in rows])
    print(json.dumps(summary) if a.json else summary, flush=True)


if __name__ == "__main__":
    main()
