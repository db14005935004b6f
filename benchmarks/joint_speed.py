"""Static speed of plans that cut width and tokens against tokens-only plans, side by side, on the CPU.

Two figures per plan, each its speedup over the unreduced model and that speedup as a fraction of
the FLOP-ideal one (1 / FLOPs ratio), the models alternating in one process (`search.deploy.bench.bench_plan`,
what `search bench` runs):

- the trained proxy model itself (`search train` output: `ltmp_vit_mnist`, 64 wide, 64 tokens);
- the plan's shape on DeiT-S (random weights, 224 px): every block keeps the same fractions of its
  patch tokens (static counts), of its heads (whole heads) and of its MLP units (steps of 48), so the
  FLOPs ratio is close to the proxy plan's.

    python benchmarks/joint_speed.py runs/structured-0.35-0/model.safetensors runs/joint-0.35-0/model.safetensors -b 1,32
"""

from __future__ import annotations

import argparse
import json

import timm
import torch

import ltmp_core
from search.deploy.bench import bench_plan


def deit_plan(plan: ltmp_core.ReductionPlan, model: torch.nn.Module) -> ltmp_core.ReductionPlan:
    """The proxy plan's shape on ``model``: its ops and token budgets, its width fractions."""
    g, src = ltmp_core.ViTGeometry.from_model(model), plan.geometry
    step = g.mlp_hidden // 32
    heads = [max(1, round(h / src.num_heads * g.num_heads)) for h, _ in plan.widths()]
    units = [max(step, step * round(m / src.mlp_hidden * g.mlp_hidden / step)) for _, m in plan.widths()]
    return ltmp_core.make_plan(model, op=list(plan.ops), keep=list(plan.keeps), importance=[l.importance for l in plan.layers],
                               merge_order=[l.merge_order for l in plan.layers],
                               squeeze_host=[l.squeeze_host for l in plan.layers], heads=heads, mlp_hidden=units)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="model.safetensors files written by search train")
    p.add_argument("-b", "--batch-sizes", default="1,32")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    import search.setup.models  # noqa: F401  (registers ltmp_vit_mnist)

    cpu = torch.device("cpu")
    for path in a.files:
        _, plan, _ = ltmp_core.read_trained(path, weights=False)
        torch.manual_seed(0)
        proxy = timm.create_model(plan.model, pretrained=False, num_classes=plan.geometry.num_classes)
        torch.manual_seed(0)
        deit = timm.create_model("deit_small_patch16_224", pretrained=False)
        for name, model, p_ in (("proxy", proxy, plan), ("deit_small", deit, deit_plan(plan, deit))):
            for batch in (int(b) for b in a.batch_sizes.split(",")):
                runs = a.runs if batch == 1 or name == "proxy" else max(3, a.runs // 4)
                row = bench_plan(model, p_, batch_size=batch, device=cpu, warmup=a.warmup, runs=runs)
                row.update(file=str(path), on=name, cuts_width=p_.cuts_width, widths=p_.widths())
                if a.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{path} on {name}, batch {batch}: {row['speedup']:.2f}x at {row['flops_ratio']:.3f} of the "
                          f"FLOPs, {row['ideal_fraction']:.2f} of ideal", flush=True)


if __name__ == "__main__":
    main()
