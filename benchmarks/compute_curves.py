"""Accuracy against compute: the search's best-so-far against LTMP trained for longer, on a proxy.

    python benchmarks/compute_curves.py --proxy mnist --flops 0.35 --seed 0 [--epochs 1,2,4,8,16]
        [--n-trials 24] [--sampler tpe|gp|random|nsga2] [--json]

Issue 14 compared the search (24 trials) with LTMP's recipe run for one epoch of the proxy's tune
split: 24 steps of 128 images, where LTMP's ImageNet epoch is about 10,000 steps. That margin is an
upper bound. Here both are given more compute and compared where their compute is equal:

- ``search``: one study of ``--n-trials`` trials (the preset: structured space, thresholds solved for
  the target). After its k-th trial, the best trial so far on the select split (at or under the
  target), at the compute of the first k trials, pruned ones included (``forward_equivalents``:
  images through the model or its teacher with each backward pass counted as well,
  :mod:`search.study.compute`).
- ``ltmp``: LTMP's released recipe (its plan, thresholds from 0.9 and 0, SGD at 5e-3 and 5e-6, tau
  0.5, ``10 (r - t)^2``, batch 128) in one long run, scored after each number of ``--epochs`` of the
  tune split; the rate stays constant over the run, as within LTMP's one epoch (its SGD has no
  momentum, so the run up to epoch e is a run of e epochs).

Every chosen plan is scored on the test split, which no selection reads. One JSON row per point:
``method``, ``proxy``, ``seed``, ``flops_target``, ``setting`` (trials or epochs), ``forward_equivalents``,
``select_top1``, ``test_top1``, ``flops_ratio`` (on test), ``seconds``, and which test images it got right
(``test_correct``: the bits in the test split's fixed order, packed by
:func:`search.setup.evaluation.pack_correct`, 168 characters for 1,000 images; ``test_images``), so two
rows of one proxy and seed can be compared image by image.

The analysis reads the rows of any number of seeds (and ``proxy_search.py --json`` rows, e.g. ToMe, TPS,
``ltmp-search``), draws test top-1 against forward equivalents and prints the search's margin over each
baseline at the default study's compute, with a paired bootstrap 95% interval over test images pooled over
seeds, and the compute factor (``benchmarks/curves_report.py`` says how each is read)::

    for S in 0 1 2; do
        python benchmarks/compute_curves.py --proxy mnist --flops 0.35 --seed $S --epochs 1,2,4,8,12,16 --json \\
            >> docs/data/compute_curves_mnist_0.35.jsonl
    done
    python benchmarks/curves_report.py docs/data/compute_curves_mnist_0.35.jsonl [PROXY_SEARCH_ROWS.jsonl] \\
        --plot docs/compute_curves_mnist_0.35.png [--json]
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
from search.setup.budget import RESOLVE_STEP
from search.setup.config import StudyConfig, resolve
from search.study.record import TrialRecord
from search.study.run import run

LTMP_BATCH = 128  # LTMP's released batch size


def _tested(config: StudyConfig, trial: optuna.trial.FrozenTrial) -> dict:
    record = TrialRecord.from_trial(trial)
    plan = ltmp_core.ReductionPlan.from_dict(record.plan)
    return validate_plan(plan, config, split="test", mode=record.eval_mode, name="curve", per_image=True)


def search_curve(config: StudyConfig, url: str, seed: int, flops: float, method: str = "search") -> list[dict]:
    """The best trial after each trial of one study, at the compute spent so far. With
    ``config.refine_top`` (method ``search+refine``) the refine stage's trials follow the sampled ones
    (``"24 trials + j refined"``), their compute added to the study's."""
    start = time.perf_counter()
    study = run(config, storage=url, study_name=f"search-{flops}-{seed}").study
    seconds = time.perf_counter() - start
    # the refine stage adds its trials after the sampled ones
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    by_number = {t.number: t for t in trials}
    rows, spent, best, tested, sampled, refined = [], 0, None, {}, 0, 0
    for k, trial in enumerate(trials, 1):
        record = TrialRecord.from_trial(trial)
        spent += record.forward_equivalents or 0
        if record.refined_from is None:
            sampled += 1
            setting, extra = f"{sampled} trials", {}
        else:
            refined += 1
            parent = TrialRecord.from_trial(by_number[record.refined_from])
            setting = f"{sampled} trials + {refined} refined"
            extra = {"refined": refined, "refined_from": record.refined_from, "refined_trial": trial.number,
                     "refined_select_top1": record.accuracy, "parent_select_top1": parent.accuracy,
                     "refined_select_flops_ratio": record.flops_ratio, "parent_select_flops_ratio": parent.flops_ratio,
                     "refine_steps": config.refine_steps}
        if trial.state == optuna.trial.TrialState.COMPLETE and record.feasible:
            if best is None or record.accuracy > TrialRecord.from_trial(best).accuracy:
                best = trial
        if best is None:
            continue
        if best.number not in tested:
            tested[best.number] = _tested(config, best)
        test = tested[best.number]
        rows.append({"method": method, "trial_steps": config.trial_steps, "seed": seed, "flops_target": flops,
                     "setting": setting, "trials": sampled, **extra,
                     "best_trial": best.number,
                     "forward_equivalents": spent, "select_top1": TrialRecord.from_trial(best).accuracy,
                     "test_top1": test["top1"], "flops_ratio": test["flops_ratio"],
                     "test_images": test["images"], "test_correct": test["correct"],
                     "seconds": round(seconds * k / len(trials), 1)})
    return rows


def _resolved_row(bench, model, budget, seed: int, flops: float, epoch: int, per_epoch: int, unreduced: float,
                  spent: int, start: float) -> dict:
    """LTMP's thresholds after ``epoch`` epochs, then one shared shift of its merge thresholds solved so the
    calibration batch costs the aim (as every search trial starts; searched from LTMP's thresholds outwards,
    as `search train` puts a trained model back on its aim): LTMP's learned shape, on the budget."""
    import copy

    from search.setup.evaluation import evaluate, pack_correct
    from search.study.compute import count_images

    resolved = copy.deepcopy(model)
    calibration = bench.data.calibration_batch(bench.config.calib_images, bench.config.seed).to(bench.device)
    images = count_images(resolved)
    ltmp_core.calibrate_to_flops(resolved, calibration, budget.aim, near=RESOLVE_STEP)
    spent += images()
    select = evaluate(resolved, bench.data.holdout_batches(250), device=bench.device, amp=bench.amp, mode="dynamic")
    test = evaluate(resolved, bench.data.test_batches(250), device=bench.device, amp=bench.amp, mode="dynamic",
                    per_image=True)
    return {"method": "ltmp+re-solve", "seed": seed, "flops_target": flops, "setting": f"{epoch} epochs",
            "epochs": epoch, "steps": epoch * per_epoch, "forward_equivalents": spent + select.images,
            "select_top1": select.accuracy, "select_flops_ratio": select.macs / unreduced,
            "test_top1": test.accuracy, "flops_ratio": test.macs / unreduced,
            "test_images": test.images, "test_correct": pack_correct(test.correct),
            "seconds": round(time.perf_counter() - start, 1)}


def ltmp_curve(config: StudyConfig, seed: int, flops: float, checkpoints: list[int],
               resolve_shift: bool = False) -> list[dict]:
    """LTMP's recipe in one run of ``max(checkpoints)`` epochs of the tune split, scored on select and
    test after each checkpoint's epoch. Its SGD has no momentum and a constant rate, so the run up to
    epoch e is exactly a run of e epochs; its compute at e is the training steps plus one select score.
    ``resolve_shift``: also a row per checkpoint of the same thresholds with one merge shift re-solved for the
    aim (method ``ltmp+re-solve``; its compute adds the bisection's passes over the calibration batch)."""
    import torch

    from search.setup.evaluation import evaluate, pack_correct
    from search.setup.workbench import Workbench
    from search.study.compute import ComputeMeter
    from search.study.objective import recipe_for
    from search.study.tuning import tune_thresholds
    from spaces import get_space, suggest

    c = replace(config, space="ltmp", batch_size=LTMP_BATCH)
    bench = Workbench.open(c)
    budget = c.flops_budget()
    plan = suggest("ltmp", optuna.trial.FixedTrial({}), bench.geometry, budget.aim, ops=c.ops, importance=c.importance)
    recipe = recipe_for(c, get_space("ltmp").budget, plan.meta.get("tuning"))
    per_epoch = math.ceil(bench.data.tune_size() / LTMP_BATCH)
    model, _ = bench.reduced(plan.with_layers(tau=[recipe.tau] * plan.depth), "dynamic")
    batches = bench.data.train_batches(LTMP_BATCH, seed)
    torch.manual_seed(seed)
    meter, rows, start, unreduced = ComputeMeter(), [], time.perf_counter(), ltmp_core.unreduced_macs(bench.geometry)
    for epoch in range(1, max(checkpoints) + 1):
        tune_thresholds(model, batches, recipe=replace(recipe, steps=per_epoch), target=budget.aim,
                        device=bench.device, amp=bench.amp)
        for _ in range(per_epoch):
            meter.step(LTMP_BATCH)
        if epoch not in checkpoints:
            continue
        select = evaluate(model, bench.data.holdout_batches(250), device=bench.device, amp=bench.amp, mode="dynamic")
        test = evaluate(model, bench.data.test_batches(250), device=bench.device, amp=bench.amp, mode="dynamic",
                        per_image=True)
        thresholds = ltmp_core.get_plan(model).layers
        if resolve_shift:
            rows.append(_resolved_row(bench, model, budget, seed, flops, epoch, per_epoch, unreduced,
                                      meter.forward_equivalents + select.images, start))
        rows.append({"method": "ltmp", "seed": seed, "flops_target": flops, "setting": f"{epoch} epochs",
                     "epochs": epoch, "steps": epoch * per_epoch,
                     "forward_equivalents": meter.forward_equivalents + select.images,
                     "select_top1": select.accuracy, "select_flops_ratio": select.macs / unreduced,
                     "test_top1": test.accuracy, "flops_ratio": test.macs / unreduced,
                     "test_images": test.images, "test_correct": pack_correct(test.correct),
                     "merge_thresholds": [round(l.merge_threshold, 4) for l in thresholds],
                     "prune_thresholds": [float(f"{l.prune_threshold:.3g}") for l in thresholds],
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", default="mnist", help="the preset whose data and base model are used")
    parser.add_argument("--flops", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-trials", type=int, default=24)
    parser.add_argument("--epochs", default="1,2,4,8,16", help="LTMP's runs, in epochs of the tune split")
    parser.add_argument("--methods", default="search,ltmp",
                        help="search, search+refine (the study, then its refine stage: --refine-top, --refine-steps), "
                             "ltmp, and ltmp+re-solve (LTMP's run, each checkpoint also re-solved on the aim)")
    parser.add_argument("--refine-top", type=int, default=2, help="search+refine: shapes refined")
    parser.add_argument("--refine-steps", type=int, default=24, help="search+refine: tuning steps per refined shape")
    parser.add_argument("--trial-steps", type=int, default=None,
                        help="tuning steps per search trial (default: the preset's); rows then name the method "
                             "'search+tune'")
    parser.add_argument("--sampler", default=None,
                        help="the search's sampler (default: the preset's, TPE); another one names the rows "
                             "'search+SAMPLER'")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = resolve(args.proxy, {"flops": args.flops, "seed": args.seed, "n_trials": args.n_trials,
                                  "trial_steps": args.trial_steps, "sampler": args.sampler})
    tuned = args.trial_steps is not None and args.trial_steps > 0
    name = "search+tune" if tuned else "search"
    if args.sampler is not None and args.sampler != "tpe":
        name += f"+{args.sampler}"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'curves.db'}"
        methods = args.methods.split(",")
        if "search" in methods:
            _emit(search_curve(config, url, args.seed, args.flops, name), args)
        if "search+refine" in methods:
            refining = replace(config, refine_top=args.refine_top, refine_steps=args.refine_steps)
            _emit(search_curve(refining, f"sqlite:///{Path(tmp) / 'refine.db'}", args.seed, args.flops,
                               "search+refine"), args)
        if "ltmp" in methods or "ltmp+re-solve" in methods:
            _emit(ltmp_curve(config, args.seed, args.flops, [int(e) for e in args.epochs.split(",")],
                             resolve_shift="ltmp+re-solve" in methods), args)


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
