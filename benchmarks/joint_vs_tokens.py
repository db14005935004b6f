"""The best `joint` plan (tokens and width) against the best tokens-only plan, each trained the same way.

For one target and seed, on the embedded default (MNIST proxy):

1. `search run --flops F --seed S` (the `structured` space: tokens only) and the same with
   `--space joint` (the structured token shape plus a per-block cut of heads and MLP units), the same
   number of trials;
2. `search export` of each study's best feasible trial (chosen on the select split);
3. `search train --recipe full --epochs E --seed S` of each plan (the same budget for both);
4. the test split, which neither search nor training reads: the untrained plan (`search validate`)
   and the trained model.

    python benchmarks/joint_vs_tokens.py --flops 0.35 --seed 0 --epochs 8 --keep runs/ --json >> docs/data/joint_vs_tokens.jsonl

Prints one row per space: search select top-1 and FLOPs ratio, images the search processed and its
seconds, the plan's widths, test top-1 and FLOPs ratio before and after training.
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
    p.add_argument("--epochs", type=int, default=8, help="epochs of search train --recipe full")
    p.add_argument("--n-trials", type=int, default=24)
    p.add_argument("--spaces", default="structured,joint")
    p.add_argument("--search-args", default="", help="more flags for both searches")
    p.add_argument("--keep", metavar="DIR", help="copy each plan and trained model here (for search bench later)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for space in a.spaces.split(","):
            name = f"{space}-{a.flops}-{a.seed}"
            start = time.perf_counter()
            run = json.loads(_search("run", "--flops", str(a.flops), "--seed", str(a.seed), "--space", space,
                                     "--n-trials", str(a.n_trials), "--study-name", name, *a.search_args.split(),
                                     "--json", cwd=cwd))
            search_s = time.perf_counter() - start
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'studies' / 'search.db'}")
            images = sum(t.user_attrs.get("images_processed", 0) for t in study.trials)
            plan_file = f"{space}.json"
            _search("export", name, "-o", plan_file, cwd=cwd)
            plan = json.loads((cwd / plan_file).read_text())
            untrained = json.loads(_search("validate", plan_file, "--json", cwd=cwd))
            start = time.perf_counter()
            out = json.loads(_search("train", plan_file, "-o", f"out-{space}", "--recipe", "full", "--epochs",
                                     str(a.epochs), "--seed", str(a.seed), "--json", cwd=cwd))
            row = {
                "space": space, "flops": a.flops, "seed": a.seed, "epochs": a.epochs, "n_trials": a.n_trials,
                "best_trial": plan["meta"]["trial"], "seeded": plan["meta"]["trial"] < study.user_attrs.get("seed_trials", 0),
                "search_select_top1": run["best"]["top1"], "search_flops_ratio": run["best"]["flops_ratio"],
                "search_images": images, "search_seconds": round(search_s, 1),
                "ops": " ".join(layer["op"] for layer in plan["layers"]),
                "heads": [layer["heads"] for layer in plan["layers"]],
                "mlp_hidden": [layer["mlp_hidden"] for layer in plan["layers"]],
                "untrained_test_top1": untrained["top1"], "untrained_test_flops_ratio": untrained["flops_ratio"],
                "test_top1": out["test_top1"], "test_flops_ratio": out["test_flops_ratio"],
                "select_top1": out["select_top1"], "base_test_top1": out["base_test_top1"],
                "static_flops_ratio": out["static_flops_ratio"], "shifted_to_aim": out["shifted_to_aim"],
                "train_seconds": round(time.perf_counter() - start, 1), "cpus": os.cpu_count(),
            }
            if a.keep:
                import shutil

                keep = Path(a.keep) / f"{space}-{a.flops}-{a.seed}"
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(cwd / plan_file, keep / "plan.json")
                shutil.copy(cwd / f"out-{space}" / "model.safetensors", keep / "model.safetensors")
                row["kept_at"] = str(keep)
            print(json.dumps(row) if a.json else row, flush=True)


if __name__ == "__main__":
    main()
