"""Throughput of a hard-static plan against the unreduced model, side by side in one run.

    python benchmarks/reduce_speed.py                       # DeiT-S, 224 px, batch 32, CPU, 35% FLOPs
    python benchmarks/reduce_speed.py --device cuda --amp --batch-size 256

Random weights and random images: speed does not depend on them in static mode (fixed counts).
The plan puts the same reduction weight on every layer and solves the per-layer budgets for the
FLOPs target with ltmp_core.budgets_for_ratio; FLOPs are multiply-accumulates (DeiT-S = 4.6 G).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch

import ltmp_core


def timed(model: torch.nn.Module, x: torch.Tensor, warmup: int, runs: int, amp: bool) -> list[float]:
    """Seconds per batch for ``runs`` timed passes after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    dtype = torch.bfloat16
    times = []
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=amp):
        for i in range(warmup + runs):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--op", default="merge+prune", choices=list(ltmp_core.OPS)[1:])
    parser.add_argument("--flops", type=float, default=0.35, help="target FLOPs ratio of the plan")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    g = ltmp_core.ViTGeometry.from_model(model)
    keeps = ltmp_core.budgets_for_ratio([args.op] * g.depth, [1.0] * g.depth, g, args.flops)
    plan = ltmp_core.make_plan(model, op=args.op, keep=keeps)
    x = torch.randn(args.batch_size, 3, *g.img_size, device=device)

    stock_macs = ltmp_core.count_flops(model)
    # Interleave the two models so that load on a shared machine hits both alike.
    reduced = ltmp_core.apply_plan(__import__("copy").deepcopy(model), plan, mode="static")
    ratio = ltmp_core.count_flops(reduced) / stock_macs
    base_t, plan_t = [], []
    for _ in range(args.runs):
        base_t += timed(model, x, args.warmup if not base_t else 0, 1, args.amp)
        plan_t += timed(reduced, x, args.warmup if not plan_t else 0, 1, args.amp)
    base, red = statistics.median(base_t), statistics.median(plan_t)
    speedup = base / red
    result = {
        "model": args.model,
        "op": args.op,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "amp": args.amp,
        "gmacs_stock": stock_macs / 1e9,
        "gmacs_plan": stock_macs * ratio / 1e9,
        "flops_ratio": ratio,
        "images_per_s_stock": args.batch_size / base,
        "images_per_s_plan": args.batch_size / red,
        "speedup": speedup,
        "ideal_speedup": 1 / ratio,
        "ideal_fraction": speedup * ratio,
        "tokens_after_each_block": plan.static_counts(),
    }
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:>24}: {v:.3f}" if isinstance(v, float) else f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
