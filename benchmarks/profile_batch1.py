"""Where the time of one batch-1 forward of a static DeiT-S plan at 0.35 goes, by aten op family.

    python benchmarks/profile_batch1.py

DeiT-S with random weights (speed does not depend on them), 224 px, CPU, 2 threads, a `merge+prune`
plan with `cls` importance at 0.35 of the FLOPs in static mode. Prints the side-by-side speedup
(median of 15, after 5 warm-up rounds) and, from `torch.profiler` over 10 forwards, each op family's
share of the aten self time, its calls and milliseconds per forward, then the most frequent ops.
"""

from __future__ import annotations

import collections
import copy
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import ltmp_core

FAMILIES = (
    ("GEMMs (linear, addmm, bmm, SDPA)", ("addmm", "mm", "linear", "bmm", "matmul", "scaled_dot")),
    ("top-k / sort", ("topk", "sort", "argsort")),
    ("gather / scatter / index", ("gather", "scatter", "index", "take")),
    ("layer norm, softmax, GELU", ("layer_norm", "softmax", "gelu", "norm")),
)


def family(name: str) -> str:
    return next((label for label, keys in FAMILIES if any(k in name for k in keys)),
                "other elementwise, copies, allocations")


def median_time(model: torch.nn.Module, x: torch.Tensor, runs: int = 15) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    g = ltmp_core.ViTGeometry.from_model(base)
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * g.depth, [1.0] * g.depth, g, 0.35)
    plan = ltmp_core.make_plan(base, op="merge+prune", keep=keeps, importance="cls")
    reduced = ltmp_core.apply_plan(copy.deepcopy(base), plan, mode="static")
    ratio = ltmp_core.count_flops(reduced) / ltmp_core.unreduced_macs(g)
    x = torch.randn(1, 3, *g.img_size)
    with torch.inference_mode():
        for _ in range(5):
            base(x)
            reduced(x)
        t_base, t_plan = median_time(base, x), median_time(reduced, x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                reduced(x)
    print(f"base {t_base * 1e3:.1f} ms, plan {t_plan * 1e3:.1f} ms, speedup {t_base / t_plan:.2f}x at a FLOPs ratio "
          f"of {ratio:.3f}: {t_base / t_plan * ratio:.2f} of the FLOP-ideal")
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    time_by, calls_by = collections.Counter(), collections.Counter()
    for e in ops:
        time_by[family(e.key)] += e.self_cpu_time_total
        calls_by[family(e.key)] += e.count
    total = sum(time_by.values())
    for name, t in time_by.most_common():
        print(f"{name:40s} {100 * t / total:5.1f}%  {calls_by[name] / 10:6.0f} calls/forward  {t / 10 / 1e3:6.2f} ms/forward")
    print()
    for e in sorted(ops, key=lambda e: -e.count)[:15]:
        print(f"{e.key:32s} {e.count / 10:6.0f} calls/forward  self {e.self_cpu_time_total / 10 / 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
