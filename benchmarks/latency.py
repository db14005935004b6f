"""Static plans at batch 1 and 32, eager and compiled, against ToMe's token counts, side by side.

    python benchmarks/latency.py [-b 1] [--compile none|default|freeze] [--runs 30] [--repeats 3] [--json]

DeiT-S (or ``--model``) with random weights (speed does not depend on them), 224 px, CPU (2 threads unless
``--threads``). In one process, the unreduced model and three static plans alternate, one timed
forward each per round after the warm-up (``search.deploy.bench.time_batches``), so load on a shared machine
hits all of them alike:

- ``merge+prune 0.35``: merge then prune in every block, ``cls`` importance, budgets for 35% of the
  FLOPs (what ``search bench --model deit_small_patch16_224 --flops 0.35`` times);
- ``tome r=R``: ToMe's constant merging (ToMe's order and parity, proportional attention) at ToMe's
  token counts for ``r`` (the ``tome`` space of the search builds the same plan);
- ``merge+prune at ToMe's counts``: this project's merge+prune plan with the token counts ToMe's
  ``r`` leaves after every block.

ToMe's own package cannot be installed on a machine that reaches only the package registries (it is
not on PyPI); if ``import tome`` works (``pip install git+https://github.com/facebookresearch/ToMe``),
its ``tome.patch.timm`` model at the same ``r`` is timed beside the others.

``--strides 2 3`` adds ``merge+prune 0.35`` run in only every 2nd (3rd) block, budgets for the same FLOPs
(``--stage-stride``'s shapes: fewer stages, each cutting harder).

``--round K`` adds ``merge+prune 0.35`` with every block's tokens (class token included) rounded up, and
down, to a multiple of K: whether counts the matrix kernels like run faster than their FLOPs say.

``--masked`` adds the first plan run through the masked reducers and compaction (the path of a
stage registered without a fast form, and of static mode before the fast forms), for a before and
after in one run.

``--compile`` compiles every model (``torch.compile``, fixed shapes; ``freeze`` also sets Inductor's
``freezing``, which folds the weights into the program, inference only). Prints one line per model
and repeat (median ms, speedup over the unreduced model of the same repeat, fraction of the
FLOP-ideal speedup), then each model's median and range over the repeats. ``--predict`` first measures the
latency model of this device as a ``--latency`` study does (eager) and prints each plan's predicted ratio of
times beside the measured one (the JSON rows carry it as ``predicted_ratio``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics

import timm
import torch

import ltmp_core
from search.deploy.bench import describe_device, time_batches
from search.deploy.program import compile_static
from search.study.latency_study import strided_plan


def tome_counts(patches: int, depth: int, r: int) -> list[float]:
    """Patch tokens ToMe keeps after each block: ``min(r, n // 2)`` merged per block."""
    keeps, n = [], patches
    for _ in range(depth):
        out = n - min(r, n // 2)
        keeps.append(out / n)
        n = out
    return keeps


def rounded(plan: ltmp_core.ReductionPlan, g: ltmp_core.ViTGeometry, multiple: int,
            up: bool) -> ltmp_core.ReductionPlan:
    """``plan`` with the tokens (prefix included) that leave every block rounded up (or down) to a multiple of
    ``multiple``: the row counts of the block's matrix products at batch 1. Never more than enter the block."""
    keeps, outs, n = [], [], g.num_patches
    for left in plan.static_counts(g.num_patches):
        total = left + g.num_prefix_tokens
        total = -(-total // multiple) * multiple if up else max(multiple, total // multiple * multiple)
        out = min(n, max(1, total - g.num_prefix_tokens))
        keeps.append(out / n)
        outs.append(out)
        n = out
    made = plan.with_layers(keep=keeps)
    assert made.static_counts(g.num_patches) == outs, (made.static_counts(g.num_patches), outs)
    return made


def plans(base: torch.nn.Module, r: int, strides: list[int] = (),
          multiple: int | None = None) -> dict[str, ltmp_core.ReductionPlan]:
    g = ltmp_core.ViTGeometry.from_model(base)
    tome_keep = tome_counts(g.num_patches, g.depth, r)
    first = strided_plan(g, "merge+prune", 1, 0.35, importance="cls")
    aligned = {} if multiple is None else {
        f"merge+prune 0.35, counts up to x{multiple}": rounded(first, g, multiple, up=True),
        f"merge+prune 0.35, counts down to x{multiple}": rounded(first, g, multiple, up=False)}
    return {
        **{f"merge+prune 0.35, every {k} blocks": strided_plan(g, "merge+prune", k, 0.35, importance="cls")
           for k in strides},
        "merge+prune 0.35": first,
        **aligned,
        f"tome r={r}": ltmp_core.make_plan(base, op="merge", keep=tome_keep, merge_order="tome"),
        f"merge+prune at ToMe r={r} counts": ltmp_core.make_plan(base, op="merge+prune", keep=tome_keep,
                                                                 importance="cls"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--batch-size", type=int, default=1)
    parser.add_argument("--model", default="deit_small_patch16_224",
                        help="timm model (ltmp_vit_mnist: the proxy's; its --img-size is 32)")
    parser.add_argument("--img-size", type=int, help="input size (default: the model's own)")
    parser.add_argument("--compile", default="none", choices=("none", "default", "freeze"))
    parser.add_argument("--r", type=int, default=22, help="ToMe's tokens merged per block (default 22)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strides", type=int, nargs="*", default=[], metavar="K",
                        help="also time merge+prune at 0.35 in only every K-th block (fewer, harder stages)")
    parser.add_argument("--round", type=int, metavar="K", dest="multiple",
                        help="also time merge+prune at 0.35 with every block's tokens (class token included) rounded "
                             "up, and down, to a multiple of K: do counts the kernels like pay on this device?")
    parser.add_argument("--predict", action="store_true",
                        help="also measure this device's latency model (as a study does, eager only) and print each "
                             "plan's predicted ratio of times beside the measured one")
    parser.add_argument("--masked", action="store_true", help="also time the first plan through the masked reducers")
    parser.add_argument("--json", action="store_true", help="one JSON object per model and repeat")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import search.setup.models  # noqa: F401  (registers the proxies' models)

    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    base = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    g = ltmp_core.ViTGeometry.from_model(base)
    unreduced = ltmp_core.unreduced_macs(g)
    models: dict[str, torch.nn.Module] = {"unreduced": base}
    ratios = {"unreduced": 1.0}
    built = plans(base, args.r, args.strides, args.multiple)
    for label, plan in built.items():
        models[label] = ltmp_core.apply_plan(copy.deepcopy(base), plan, mode="static")
        ratios[label] = ltmp_core.count_flops(models[label]) / unreduced
    x = torch.randn(args.batch_size, 3, *g.img_size)
    if args.masked:  # the plan's static program is worked out on its first forward: run it without fast forms
        label = next(iter(plans(base, args.r)))
        fast = dict(ltmp_core.REDUCERS)
        ltmp_core.REDUCERS.update({k: dataclasses.replace(v, static=None) for k, v in fast.items()})
        try:
            masked = ltmp_core.apply_plan(copy.deepcopy(base), plans(base, args.r)[label], mode="static")
            with torch.inference_mode():
                masked(x)
        finally:
            ltmp_core.REDUCERS.update(fast)
        models[f"{label}, masked reducers"] = masked
        ratios[f"{label}, masked reducers"] = ratios[label]
    try:
        import tome  # ToMe's published code, when the user has installed it

        reference = copy.deepcopy(base)
        tome.patch.timm(reference)
        reference.r = args.r
        models[f"ToMe's code r={args.r}"] = reference
        ratios[f"ToMe's code r={args.r}"] = ratios[f"tome r={args.r}"]
    except ImportError:
        pass
    predicted: dict[str, float] = {}
    if args.predict:
        from search.setup.latency import kinds_for, measure_latency_model

        kinds = kinds_for(["merge", "merge+prune"], ["cls"])
        latency_model = measure_latency_model(base, kinds, batch=args.batch_size, device=torch.device("cpu"))
        predicted = {label: latency_model.ratio(plan, g) for label, plan in built.items()}
        predicted["unreduced"] = 1.0
    if args.compile == "freeze":
        torch._inductor.config.freezing = True
    device = torch.device("cpu")
    # compile_static lifts Dynamo's recompile limit: every plan is a graph of the same forward, and with
    # the default limit (8) the models compiled last ran eager (2026-12-07: merge+prune 0.35 at 0.48 of ideal).
    runners = {k: (m if args.compile == "none" else compile_static(m, device)) for k, m in models.items()}
    summary: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    with torch.inference_mode():
        for repeat in range(args.repeats):
            times = time_batches([lambda m=m: m(x) for m in runners.values()], device,
                                 args.warmup if repeat else args.warmup + 2, args.runs)
            medians = {k: statistics.median(t) for k, t in zip(runners, times)}
            for k, ms in medians.items():
                speedup = medians["unreduced"] / ms
                summary[k].append((speedup, speedup * ratios[k]))
                row = {"model": k, "repeat": repeat, "batch": args.batch_size, "compiled": args.compile,
                       "flops_ratio": ratios[k], "ms": 1000 * ms, "speedup": speedup,
                       "ideal_fraction": speedup * ratios[k], "predicted_ratio": predicted.get(k),
                       "device": describe_device(device),
                       "torch": torch.__version__, "timm": timm.__version__}
                print(json.dumps(row) if args.json else
                      f"{repeat}  {k:36s} {ratios[k]:.3f}  {1000 * ms:7.1f} ms  {speedup:5.2f}x  {speedup * ratios[k]:.2f} of ideal")
    if not args.json:
        print(f"\nbatch {args.batch_size}, compile {args.compile}, {describe_device(device)}, "
              f"torch {torch.__version__}: median (range) over {args.repeats} repeats")
        for k, rows in summary.items():
            sp, fr = [s for s, _ in rows], [f for _, f in rows]
            print(f"{k:36s} {statistics.median(sp):5.2f}x ({min(sp):.2f}-{max(sp):.2f})  "
                  f"{statistics.median(fr):.2f} of ideal ({min(fr):.2f}-{max(fr):.2f})"
                  + (f"  time ratio {1 / statistics.median(sp):.3f}, predicted {predicted[k]:.3f}" if k in predicted else ""))


if __name__ == "__main__":
    main()
