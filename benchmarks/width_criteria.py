"""Width cuts alone on the MNIST proxy: torch-pruning's criteria, and what a short recovery gives back.

For a few uniform width cuts (heads and MLP units kept in every block, no token reduction), the
select top-1 of the shipped base model cut by each criterion (`taylor` on the 256 calibration
images, `magnitude`, `random`), then after `recover_steps` steps of the trial's recovery (norms and
biases towards the unreduced model; `search.setup.width.recover`) and, for comparison, after the same
steps on every weight.

    python benchmarks/width_criteria.py --steps 30 --json >> docs/data/width_criteria.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import ltmp_core
from search.setup.config import resolve
from search.setup.evaluation import unreduced_accuracy
from search.setup.models import load_base_model
from search.setup.workbench import open_data
from search.setup.width import WidthCut, cut_width

#: (heads, MLP units) kept in every block of ltmp_vit_mnist (4 heads, 256 units).
CUTS = [(4, 128), (4, 64), (3, 256), (2, 256), (3, 128)]


def every_weight(model, teacher, data, steps: int, lr: float) -> None:
    """The comparison: the same recovery on all weights, not only norms and biases."""
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = data.train_batches(64, 0)
    for _ in range(steps):
        x, _ = next(batches)
        with torch.no_grad():
            target = teacher(x).log_softmax(dim=-1)
        loss = F.kl_div(model(x).log_softmax(dim=-1), target, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    cpu = torch.device("cpu")
    config = resolve("mnist", {})
    data = open_data(config, cpu)
    base, _ = load_base_model(config.model, data, img_size=config.img_size, base_epochs=config.base_epochs)
    g = ltmp_core.ViTGeometry.from_model(base)

    def top1(model) -> float:
        return unreduced_accuracy(model, data.holdout_batches(250), device=cpu)[0]

    print(json.dumps({"base_select_top1": top1(base)}) if a.json else f"unreduced: {top1(base):.3f}", flush=True)
    for heads, units in CUTS:
        plan = ltmp_core.make_plan(g, op="none", heads=heads, mlp_hidden=units)
        for criterion in ("taylor", "magnitude", "random"):
            cut = WidthCut(importance=criterion, calib_images=config.calib_images, seed=0)
            start = time.perf_counter()
            model = copy.deepcopy(base)
            cut_width(model, plan, data, cut, device=cpu)
            row = {"heads": heads, "mlp_hidden": units, "criterion": criterion,
                   "flops_ratio": ltmp_core.count_flops(model) / ltmp_core.unreduced_macs(g),
                   "cut_seconds": round(time.perf_counter() - start, 2), "select_top1": top1(model)}
            recovered = copy.deepcopy(base)
            cut_width(recovered, plan, data, replace(cut, recover_steps=a.steps), device=cpu, teacher=base)
            row[f"norms_biases_{a.steps}_steps"] = top1(recovered)
            every_weight(model, base, data, a.steps, 1e-4)
            row[f"all_weights_{a.steps}_steps"] = top1(model)
            print(json.dumps(row) if a.json else row, flush=True)


if __name__ == "__main__":
    main()
