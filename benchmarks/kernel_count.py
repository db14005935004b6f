"""Where an eager forward's time goes: kernels launched, time the device is busy, and wall time, for the
unreduced model and a static plan side by side (random weights: the cost does not depend on them).

On a GPU, a forward whose wall time is far above its kernels' busy time is bound by launching them
(the host), not by the device: fewer operations per block, or CUDA graphs (``--compile``), are then
what make it faster. On the CPU the "kernels" are the operators the profiler records.

    python benchmarks/kernel_count.py --model deit_small_patch16_224 --flops 0.35 -b 1 --device cuda --json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import ltmp_core  # noqa: E402


def measure(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: bool, runs: int) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)

    with torch.inference_mode():
        for _ in range(3):
            forward()
        sync()
        walls = []
        for _ in range(runs):
            start = time.perf_counter()
            forward()
            sync()
            walls.append(time.perf_counter() - start)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            forward()
            sync()
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)
    else:
        kernels = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        busy_us = sum(e.cpu_time_total for e in kernels)
    return {"wall_ms": 1000 * statistics.median(walls), "kernels": len(kernels), "busy_ms": busy_us / 1000,
            "aten_calls": sum(1 for e in events if e.name.startswith("aten::"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--flops", type=float, default=0.35)
    p.add_argument("--op", default="merge+prune")
    p.add_argument("--importance", default="cls")
    p.add_argument("-b", "--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 (default on CUDA)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval().to(device)
    g = ltmp_core.ViTGeometry.from_model(base)
    keeps = ltmp_core.budgets_for_ratio([args.op] * g.depth, [1.0] * g.depth, g, args.flops)
    plan = ltmp_core.make_plan(base, op=args.op, keep=keeps, importance=args.importance)
    reduced = ltmp_core.apply_plan(copy.deepcopy(base), plan, mode="static")
    x = torch.randn(args.batch_size, 3, *g.img_size, device=device)
    row = {"model": args.model, "batch": args.batch_size, "device": str(device), "amp": amp, "op": args.op,
           "flops_ratio": ltmp_core.count_flops(reduced) / ltmp_core.unreduced_macs(g),
           "base": measure(base, x, device, amp, args.runs), "plan": measure(reduced, x, device, amp, args.runs)}
    if args.json:
        print(json.dumps(row))
    else:
        for key in ("base", "plan"):
            r = row[key]
            print(f"{key}: {r['wall_ms']:.2f} ms wall, {r['kernels']} kernels busy {r['busy_ms']:.2f} ms, "
                  f"{r['aten_calls']} aten calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
