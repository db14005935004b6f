"""Throughput of a hard-static plan against the unreduced model, side by side in one run.

    python benchmarks/reduce_speed.py                       # DeiT-S, 224 px, batch 32, CPU, 35% FLOPs
    python benchmarks/reduce_speed.py --importance cls      # prune/squeeze scores from the class query
    python benchmarks/reduce_speed.py --device cuda --amp --batch-size 256

Random weights and random images: speed does not depend on them in static mode (fixed counts).
The plan puts the same reduction weight on every layer and solves the per-layer budgets for the
FLOPs target with ltmp_core.budgets_for_ratio; FLOPs are multiply-accumulates (DeiT-S = 4.6 G).
The same measurement is ``search bench --model deit_small_patch16_224 --flops 0.35`` (stored).
"""

from __future__ import annotations

import argparse
import json

import timm
import torch

import ltmp_core
from search.deploy.bench import bench_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--op", default="merge+prune", choices=list(ltmp_core.OPS)[1:])
    parser.add_argument("--flops", type=float, default=0.35, help="target FLOPs ratio of the plan")
    parser.add_argument("--importance", default="mean", choices=("mean", "cls"),
                        help="prune/squeeze scores: mean attention received (needs the map) or the class token's")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    g = ltmp_core.ViTGeometry.from_model(model)
    keeps = ltmp_core.budgets_for_ratio([args.op] * g.depth, [1.0] * g.depth, g, args.flops)
    plan = ltmp_core.make_plan(model, op=args.op, keep=keeps, importance=args.importance)
    result = bench_plan(model, plan, batch_size=args.batch_size, device=torch.device(args.device), amp=args.amp,
                        warmup=args.warmup, runs=args.runs)
    result.update(op=args.op, importance=args.importance, tokens_after_each_block=plan.static_counts())
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:>28}: {v:.3f}" if isinstance(v, float) else f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
