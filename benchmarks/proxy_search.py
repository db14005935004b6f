"""The search against the published methods at equal compute, on a proxy: the embedded default
(``--proxy mnist``, digits on black) or MNIST-M (``--proxy mnistm``, the same digits on photograph
crops, texture in every patch; issue 26).

    python benchmarks/proxy_search.py --flops 0.35 --seed 0 [--proxy mnistm] [--json] [--methods search,ltmp,...]
    python benchmarks/proxy_search.py --flops 0.35 --seed 0 --ablation

Methods (each a study in a temporary SQLite database, the same data, base model and select split):

- ``search``: the default search (the proxy's preset: structured space, thresholds solved for the
  target, ``--n-trials`` trials).
- ``ltmp``: LTMP's released recipe, one trial of one epoch of the tune split (24 steps of 128).
- ``ltmp-search``: LTMP with its recipe's learning rates, tau and budget weight searched by TPE over
  ``--ltmp-trials`` trials of one epoch each (the fair baseline).
- ``tome``: ToMe's constant r, one trial (no training). ``tps``: TPS's squeeze at three blocks, one trial.
- ``layerwise``: this project's first search (per-layer ops and budgets, 40 tuning steps per trial).

Every method's best trial is chosen on the select split; its plan is then scored on the test split
(never seen by any search). Per method: test top-1, select top-1, measured FLOPs ratio on test,
the study's compute over all its trials, pruned and failed ones included (``images_processed``: images
through the model or its teacher, every pass; ``forward_equivalents``: the same with each backward
pass counted, :mod:`search.study.compute`; the test score is not counted: it is not part of the
method) and wall time. With --json, one JSON object per line.

``--ablation`` runs LTMP's recipe with one of this project's choices swapped in at a time and prints
what each changes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from search.setup.config import resolve
from search.study.results import accuracy_of, best_trial
from search.study.run import run
from search.deploy.validate import validate_plan

import ltmp_core

TUNE_IMAGES = 3000  # the tune split of the mnist and mnistm presets
PROXIES = ("mnist", "mnistm")  # the presets a proxy names
LTMP_BATCH = 128  # LTMP's released batch size


def run_method(method: str, flops: float, seed: int, url: str, n_trials: int, ltmp_trials: int,
               proxy: str = "mnist") -> dict:
    base = resolve(proxy, {"flops": flops, "seed": seed})
    epoch = math.ceil(TUNE_IMAGES / LTMP_BATCH)
    configs = {
        "search": replace(base, n_trials=n_trials),
        "ltmp": replace(base, space="ltmp", n_trials=1, trial_steps=epoch, batch_size=LTMP_BATCH),
        "ltmp-search": replace(base, space="ltmp-search", n_trials=ltmp_trials, trial_steps=epoch,
                               batch_size=LTMP_BATCH),
        "tome": replace(base, space="tome", n_trials=1),
        "tps": replace(base, space="tps", n_trials=1),
        "layerwise": replace(base, space="layerwise", n_trials=12, trial_steps=40, batch_size=64, importance=("mean",)),
    }
    config = configs[method]
    start = time.perf_counter()
    result = run(config, storage=url, study_name=f"{method}-{flops}-{seed}")
    seconds = time.perf_counter() - start
    study = result.study
    trials = study.get_trials(deepcopy=False)
    images = sum(t.user_attrs.get("images_processed", 0) for t in trials)
    forward_equivalents = sum(t.user_attrs.get("forward_equivalents", 0) for t in trials)
    best = best_trial(study)
    row = {"method": method, "proxy": proxy, "seed": seed, "flops_target": flops, "trials": len(trials),
           "test_top1": None, "select_top1": None, "flops_ratio": None, "images_processed": images,
           "forward_equivalents": forward_equivalents, "seconds": round(seconds, 1)}
    if best is None:  # nothing at or under the target on the select split
        chosen = max((t for t in trials if t.values), key=lambda t: accuracy_of(t), default=None)
        row["note"] = "no trial at or under the target on the select split"
        if chosen is None:
            return row
    else:
        chosen = best
    plan = ltmp_core.ReductionPlan.from_dict(chosen.user_attrs["plan"])
    tested = validate_plan(plan, config, split="test", mode=chosen.user_attrs.get("eval_mode"), name=method,
                           per_image=True)
    row.update(test_top1=tested["top1"], select_top1=accuracy_of(chosen), flops_ratio=tested["flops_ratio"],
               test_images=tested["images"], test_correct=tested["correct"],
               feasible_on_test=tested["flops_ratio"] <= flops, best_trial=chosen.number,
               ops=" ".join(layer.op for layer in plan.layers),
               seeded=chosen.number < study.user_attrs.get("seed_trials", 0))
    return row


def ablation(flops: float, seed: int, proxy: str = "mnist") -> list[dict]:
    """LTMP's recipe, then one of this project's choices at a time (one trial each, one epoch)."""
    from search.setup.evaluation import evaluate
    from search.study.tuning import Recipe, tune_thresholds
    from spaces import LTMP_TUNING
    from search.setup.models import load_base_model
    from search.setup.workbench import open_data
    import copy
    import torch

    config = resolve(proxy, {"flops": flops, "seed": seed})
    cpu = torch.device("cpu")
    data = open_data(config, cpu)
    base, _ = load_base_model(config.model, data, img_size=config.img_size, base_epochs=config.base_epochs)
    g = ltmp_core.ViTGeometry.from_model(base)
    unreduced = ltmp_core.unreduced_macs(g)
    aim = flops * (1 - config.flops_margin)
    calib = data.calibration_batch(config.calib_images, seed)
    epoch = math.ceil(TUNE_IMAGES / LTMP_BATCH)
    depth = g.depth
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * depth, [1.0] * depth, g, aim)
    merge_keeps = ltmp_core.budgets_for_ratio(["merge"] * depth, [1.0] * depth, g, aim)

    def plan(op="merge+prune", **variant):
        layer = dict(merge_order="tome", importance="mean", importance_scale="raw", tau=0.5)
        layer.update(variant)
        p = ltmp_core.make_plan(g, op=op, keep=keeps if op == "merge+prune" else merge_keeps, **layer)
        if op == "merge":
            return p.with_layers(merge_threshold=[0.9] * depth)
        return p.with_layers(merge_threshold=[0.9] * depth, prune_threshold=[0.0] * depth)

    ltmp = dict(LTMP_TUNING)
    # This project's soft forward: the variants below change what LTMP's released forward cannot run.
    project = {**ltmp, "soft_form": "project"}
    cases = [
        ("LTMP's released recipe", plan(), Recipe(steps=epoch, **ltmp), LTMP_BATCH),
        ("LTMP's recipe through this project's soft forward", plan(), Recipe(steps=epoch, **project), LTMP_BATCH),
        ("order-preserving merge split (merge_order=keep)", plan(merge_order="keep"), Recipe(steps=epoch, **project),
         LTMP_BATCH),
        ("importance relative to the live count (x n)", plan(importance_scale="relative"),
         Recipe(steps=epoch, **project), LTMP_BATCH),
        ("per-layer budgets calibrated, then LTMP's SGD", plan(), Recipe(steps=epoch, **{**ltmp, "start": "calibrate"}),
         LTMP_BATCH),
        ("per-layer budgets, Adam at the score scale, global term x1000",
         plan(tau=0.1), Recipe(steps=40, start="calibrate", budget="global"), 64),
        ("per-layer budgets, Adam, per-layer term x1000 (the first search's)",
         plan(tau=0.1), Recipe(steps=40, start="calibrate", budget="layer"), 64),
        ("merge only, equal per-layer budgets calibrated, no tuning", plan("merge"),
         Recipe(steps=0, start="calibrate"), 64),
        ("merge only, one shared threshold solved for the target, no tuning", plan("merge"),
         Recipe(steps=0, start="solve"), 64),
        ("one shared merge threshold solved for the target, no tuning", plan(), Recipe(steps=0, start="solve"), 64),
        ("solved, then LTMP's SGD", plan(), Recipe(steps=epoch, **{**ltmp, "start": "solve"}), LTMP_BATCH),
        ("solved, then Adam at the score scale, global term x1000", plan(tau=0.1),
         Recipe(steps=40, start="solve", budget="global"), 64),
    ]
    rows = []
    for name, p, recipe, batch in cases:
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        ltmp_core.apply_plan(model, p.with_layers(tau=[recipe.tau] * depth), mode="static")
        start = time.perf_counter()
        if recipe.start == "calibrate":
            ltmp_core.calibrate(model, calib)
        elif recipe.start == "solve":
            ltmp_core.calibrate_to_flops(model, calib, aim)
        ltmp_core.set_mode(model, "dynamic")
        tune_thresholds(model, data.train_batches(batch, seed), recipe=recipe, target=aim, device=cpu)
        sel = evaluate(model, data.holdout_batches(250), device=cpu)
        test = evaluate(model, data.test_batches(250), device=cpu)
        rows.append({"case": name, "seed": seed, "flops_target": flops, "select_top1": sel.accuracy,
                     "select_ratio": sel.macs / unreduced, "test_top1": test.accuracy,
                     "test_ratio": test.macs / unreduced, "seconds": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-trials", type=int, default=24, help="trials of the search (default: the preset's)")
    parser.add_argument("--ltmp-trials", type=int, default=12, help="trials of ltmp-search")
    parser.add_argument("--methods", default="search,ltmp,ltmp-search,tome,tps")
    parser.add_argument("--proxy", choices=PROXIES, default="mnist",
                        help="the preset (data, base model, search settings) every method runs on")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.ablation:
        rows = ablation(args.flops, args.seed, args.proxy)
        for r in rows:
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"| {r['case']} | {100 * r['select_top1']:.1f}% at {r['select_ratio']:.3f} | "
                      f"{100 * r['test_top1']:.1f}% at {r['test_ratio']:.3f} | {r['seconds']:.0f} s |", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'proxy.db'}"
        for method in args.methods.split(","):
            row = run_method(method, args.flops, args.seed, url, args.n_trials, args.ltmp_trials, args.proxy)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
                print(f"| {method} | {args.seed} | {row['trials']} | {pct(row['test_top1'])} | {pct(row['select_top1'])} "
                      f"| {row['flops_ratio'] if row['flops_ratio'] is None else round(row['flops_ratio'], 3)} "
                      f"| {row['images_processed']} | {row['seconds']:.0f} s | {row.get('ops', '')} "
                      f"| {row.get('note', '')} |", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
