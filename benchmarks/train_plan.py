"""From a search's best plan to a trained model, on the MNIST proxy: what `search train` adds.

For each seed: `search run --flops F --seed S` (the embedded default), `search export`, then
`search train --recipe ltmp` (LTMP's released recipe: thresholds only, one epoch) and
`search train --recipe full` (weights and thresholds) with the given epochs; every figure is on the
test split, which neither the search nor the training reads (training evaluates on select).

    python benchmarks/train_plan.py --flops 0.35 --seed 0 --epochs 10 --json >> docs/data/train.jsonl

Prints one JSON row per seed and recipe (``--json``) or a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _commands import search as _search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flops", type=float, default=0.35)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10, help="epochs of --recipe full")
    p.add_argument("--recipes", default="ltmp,full")
    p.add_argument("--full-args", default="", help="more flags for --recipe full, e.g. '--distill --lr 2e-4'")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        start = time.perf_counter()
        run = json.loads(_search("run", "--flops", str(a.flops), "--seed", str(a.seed), "--json", cwd=cwd))
        search_s = time.perf_counter() - start
        _search("export", run["study"], "-o", "plan.json", cwd=cwd)
        for recipe in a.recipes.split(","):
            flags = ["--recipe", recipe, "--seed", str(a.seed)]
            if recipe == "full":
                flags += ["--epochs", str(a.epochs), *a.full_args.split()]
            start = time.perf_counter()
            out = json.loads(_search("train", "plan.json", "-o", f"out-{recipe}", *flags, "--json", cwd=cwd))
            row = {
                "flops": a.flops, "seed": a.seed, "recipe": recipe, "epochs": out["epochs"], "steps": out["steps"],
                "flags": " ".join(flags), "search_select_top1": run["best"]["top1"],
                "search_flops_ratio": run["best"]["flops_ratio"], "search_seconds": round(search_s, 1),
                "untrained_test_top1": None, "test_top1": out["test_top1"], "test_flops_ratio": out["test_flops_ratio"],
                "static_flops_ratio": out["static_flops_ratio"], "select_top1": out["select_top1"],
                "base_test_top1": out["base_test_top1"], "shifted_to_aim": out["shifted_to_aim"],
                "train_seconds": round(time.perf_counter() - start, 1), "cpus": os.cpu_count(),
            }
            validated = json.loads(_search("validate", "plan.json", "--json", cwd=cwd))
            row["untrained_test_top1"] = validated["top1"]
            row["untrained_test_flops_ratio"] = validated["flops_ratio"]
            if a.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{recipe:5s} seed {a.seed}: test top-1 {row['test_top1']:.4f} at {row['test_flops_ratio']:.3f} "
                      f"(untrained plan {row['untrained_test_top1']:.4f}, unreduced {row['base_test_top1']:.4f}), "
                      f"{row['train_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
