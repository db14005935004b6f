"""Which score of a trial on the select split picks the plan that does best on unseen images?

    python benchmarks/selection_criteria.py --proxy mnistm --flops 0.35 --seed 0 [--n-trials 24] [--json]
    python benchmarks/selection_criteria.py --report ROWS.jsonl [ROWS.jsonl ...]

A study scores each trial by its top-1 on the select split (1,000 images on the proxies) and names the
best one. Among 24 trials whose top-1 differ by about a point, the best-on-select is biased upwards by
about that spread (the winner's curse, docs/benchmarks.md, issue 26): select top-1 counts right and
wrong answers only, so two plans that disagree on a handful of images cannot be told apart. Scores that
read every image's whole output vary less between images:

- ``top1``: select top-1 (what the study maximises);
- ``nll``: mean cross-entropy of the plan's logits against the labels (lower is better);
- ``kl``: mean KL divergence from the unreduced model's softmax to the plan's (lower is better; reads no
  labels: how far the plan moves the model it reduces);
- ``agree``: share of select images where the plan's top-1 equals the unreduced model's.

The criteria are judged without the test split, by cross-fitting on select: ``--splits`` random halvings of
the select images; on each, the criterion picks a trial on one half and that trial's top-1 is read on
the other half (both ways); the mean over halvings is ``crossfit_top1``, the top-1 on unseen select
images of the trial each criterion picks (from half as many images). The test split's top-1 of each
criterion's pick on the whole select split is reported beside it (``test_top1``), never used to choose.

Rows (``--json``): one per scored trial (``kind: "trial"``: trial number, feasible, FLOPs ratio on
select, the four scores, test top-1) and one per criterion (``kind: "criterion"``: its pick on the whole
select split, the pick's test top-1, ``crossfit_top1``). Only trials at or under the FLOPs target on
select are candidates, as in the study.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ltmp_core  # noqa: E402
from search.setup.config import resolve  # noqa: E402
from search.setup.evaluation import autocast  # noqa: E402
from search.setup.workbench import Workbench  # noqa: E402
from search.study.record import TrialRecord  # noqa: E402
from search.study.run import run  # noqa: E402

#: The criteria (:func:`per_image_scores`) and which way each is better.
CRITERIA = ("top1", "nll", "kl", "agree")
HIGHER_IS_BETTER = {"top1": True, "nll": False, "kl": False, "agree": True}


@torch.no_grad()
def outputs(model: torch.nn.Module, batches, bench: Workbench, mode: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of every image of the split, in order, and the labels."""
    if mode is not None:
        ltmp_core.set_mode(model, mode)
    model.eval()
    logp, labels = [], []
    for x, y in batches:
        with autocast(bench.device, bench.amp):
            logits = model(x.to(bench.device))
        logp.append(F.log_softmax(logits.float(), dim=-1).cpu())
        labels.append(y.cpu())
    return torch.cat(logp), torch.cat(labels)


def per_image_scores(logp: torch.Tensor, y: torch.Tensor, base_logp: torch.Tensor) -> dict[str, np.ndarray]:
    """Every criterion's per-image value (the criterion is their mean)."""
    return {
        "top1": (logp.argmax(dim=-1) == y).double().numpy(),
        "nll": (-logp.gather(1, y[:, None]).squeeze(1)).double().numpy(),
        "kl": (base_logp.exp() * (base_logp - logp)).sum(dim=-1).double().numpy(),
        "agree": (logp.argmax(dim=-1) == base_logp.argmax(dim=-1)).double().numpy(),
    }


def pick(scores: list[dict[str, np.ndarray]], criterion: str, index: np.ndarray | None = None) -> int:
    """Place in ``scores`` of the trial the criterion prefers on the images ``index`` (all: ``None``);
    ties go to the earlier trial, as the study's best trial does."""
    values = [s[criterion].mean() if index is None else s[criterion][index].mean() for s in scores]
    order = np.argsort(-np.asarray(values) if HIGHER_IS_BETTER[criterion] else np.asarray(values), kind="stable")
    return int(order[0])


def ceiling(rows: list[dict]) -> list[dict]:
    """Per (proxy, target, sampler, seed) of the ``kind: "trial"`` rows (rows without a sampler: TPE's): the
    feasible trials' count, the test top-1 of the trial the study picks (highest select top-1, ties to the
    earlier trial) and the highest test top-1 among them (ties to the earlier trial), with their numbers."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("kind") == "trial" and row["feasible"]:
            key = (row["proxy"], row["flops_target"], row.get("sampler", "tpe"), row["seed"])
            groups.setdefault(key, []).append(row)
    out = []
    for (proxy, target, sampler, seed), trials in sorted(groups.items()):
        trials = sorted(trials, key=lambda r: r["trial"])
        picked = max(trials, key=lambda r: r["top1"])  # max keeps the first of equals
        best = max(trials, key=lambda r: r["test_top1"])
        out.append({"proxy": proxy, "flops_target": target, "sampler": sampler, "seed": seed,
                    "candidates": len(trials), "picked_trial": picked["trial"],
                    "picked_test_top1": picked["test_top1"], "ceiling_trial": best["trial"],
                    "ceiling_test_top1": best["test_top1"]})
    return out


def report(paths: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    found = ceiling(rows)
    print("| proxy | target | sampler | seed | candidates | picked (select top-1): test | ceiling: test |")
    print("|---|---|---|---|---|---|---|")
    for r in found:
        print(f"| {r['proxy']} | {r['flops_target']} | {r['sampler']} | {r['seed']} | {r['candidates']} "
              f"| trial {r['picked_trial']}: {100 * r['picked_test_top1']:.1f}% "
              f"| trial {r['ceiling_trial']}: {100 * r['ceiling_test_top1']:.1f}% |")
    for key in sorted({(r["proxy"], r["flops_target"], r["sampler"]) for r in found}):
        mine = [r for r in found if (r["proxy"], r["flops_target"], r["sampler"]) == key]
        print(f"{' '.join(map(str, key))}: {len(mine)} seeds, picked "
              f"{100 * np.mean([r['picked_test_top1'] for r in mine]):.2f}%, "
              f"ceiling {100 * np.mean([r['ceiling_test_top1'] for r in mine]):.2f}%")
    counts: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("kind") == "trials":
            key = (row["proxy"], row["flops_target"], row.get("sampler", "tpe"), row["trials"])
            counts.setdefault(key, []).append(row)
    if counts:
        print("\n| proxy | target | sampler | first k trials | seeds | forward equivalents (mean) "
              "| cross-fit top-1 (mean) | test top-1 of the pick (mean) |")
        print("|---|---|---|---|---|---|---|---|")
    for (proxy, target, sampler, k), mine in sorted(counts.items()):
        print(f"| {proxy} | {target} | {sampler} | {k} | {len(mine)} "
              f"| {np.mean([r['forward_equivalents'] for r in mine]):,.0f} "
              f"| {100 * np.mean([r['crossfit_top1'] for r in mine]):.2f}% "
              f"| {100 * np.mean([r['test_top1'] for r in mine]):.2f}% |")


def crossfit(scores: list[dict[str, np.ndarray]], criterion: str, splits: int, seed: int) -> float:
    """Mean top-1, on the other half, of the trial the criterion picks on one half of the select images."""
    n = len(scores[0]["top1"])
    rng = np.random.default_rng(seed)
    held = []
    for _ in range(splits):
        perm = rng.permutation(n)
        a, b = perm[: n // 2], perm[n // 2:]
        for choose, judge in ((a, b), (b, a)):
            held.append(scores[pick(scores, criterion, choose)]["top1"][judge].mean())
    return float(np.mean(held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", default="mnistm")
    parser.add_argument("--flops", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-trials", type=int, default=24)
    parser.add_argument("--splits", type=int, default=200, help="random halvings of select for cross-fitting")
    parser.add_argument("--sampler", default=None, help="the study's sampler (default: the preset's, TPE)")
    parser.add_argument("--trial-counts", default="6,12,18,24",
                        help="the study's pick among its first k trials, cross-fitted, for each k")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--report", nargs="+", metavar="ROWS", help="print the picks and ceilings of these rows")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = resolve(args.proxy, {"flops": args.flops, "seed": args.seed, "n_trials": args.n_trials,
                                  "sampler": args.sampler})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        study = run(config, storage=f"sqlite:///{Path(tmp) / 'criteria.db'}", study_name="criteria").study
    study_seconds = time.perf_counter() - start
    bench = Workbench.open(config)
    base_select, y_select = outputs(bench.base, bench.data.holdout_batches(config.batch_size), bench, None)
    base_test, y_test = outputs(bench.base, bench.data.test_batches(config.batch_size), bench, None)
    common = {"proxy": args.proxy, "seed": args.seed, "flops_target": args.flops, "sampler": config.sampler}
    trials, scores, tests, spent, rows = [], [], [], {}, []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        record = TrialRecord.from_trial(trial)
        spent[trial.number] = record.forward_equivalents or 0
        if trial.state != optuna.trial.TrialState.COMPLETE or record.plan is None:
            continue
        plan = ltmp_core.ReductionPlan.from_dict(record.plan)
        model, _ = bench.reduced(plan, record.eval_mode)
        logp, _ = outputs(model, bench.data.holdout_batches(config.batch_size), bench, record.eval_mode)
        s = per_image_scores(logp, y_select, base_select)
        logp_test, _ = outputs(model, bench.data.test_batches(config.batch_size), bench, record.eval_mode)
        test_top1 = float((logp_test.argmax(dim=-1) == y_test).double().mean())
        row = {"kind": "trial", **common, "trial": trial.number, "feasible": bool(record.feasible),
               "select_flops_ratio": record.flops_ratio, "study_select_top1": record.accuracy,
               **{c: round(float(v.mean()), 6) for c, v in s.items()}, "test_top1": test_top1}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        if record.feasible:
            trials.append(trial.number)
            scores.append(s)
            tests.append(test_top1)
    for criterion in CRITERIA:
        chosen = pick(scores, criterion)
        row = {"kind": "criterion", **common, "criterion": criterion, "candidates": len(scores),
               "trial": trials[chosen], "select_top1": float(scores[chosen]["top1"].mean()),
               "crossfit_top1": crossfit(scores, criterion, args.splits, args.seed),
               "test_top1": tests[chosen], "study_seconds": round(study_seconds, 1)}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"| {criterion} | trial {row['trial']} | select {100 * row['select_top1']:.1f}% "
                  f"| cross-fit {100 * row['crossfit_top1']:.2f}% | test {100 * row['test_top1']:.1f}% |")
    for k in (int(v) for v in args.trial_counts.split(",")):
        first = [i for i, number in enumerate(trials) if number < k]
        if not first:
            continue
        chosen = first[pick([scores[i] for i in first], "top1")]
        row = {"kind": "trials", **common, "trials": k, "candidates": len(first),
               "forward_equivalents": sum(v for number, v in spent.items() if number < k),
               "trial": trials[chosen], "select_top1": float(scores[chosen]["top1"].mean()),
               "crossfit_top1": crossfit([scores[i] for i in first], "top1", args.splits, args.seed),
               "test_top1": tests[chosen]}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"| first {k} trials | trial {row['trial']} | select {100 * row['select_top1']:.1f}% "
                  f"| cross-fit {100 * row['crossfit_top1']:.2f}% | test {100 * row['test_top1']:.1f}% |")
    top = ceiling(rows)[0]
    row = {"kind": "ceiling", **common, "candidates": top["candidates"], "trial": top["ceiling_trial"],
           "test_top1": top["ceiling_test_top1"]}
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        print(f"| ceiling (read on test, no method) | trial {row['trial']} | - | - | test {100 * row['test_top1']:.1f}% |")


if __name__ == "__main__":
    main()
