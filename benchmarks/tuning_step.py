"""A threshold-tuning step against a full fine-tuning step of the same patched model.

    python benchmarks/tuning_step.py [--model deit_small_patch16_224] [-b 32]

Both steps run soft mode (masked attention, straight-through masks) on the same batch: forward,
cross-entropy plus the per-layer budget term, backward, an optimiser step. Threshold tuning freezes
the weights (no weight gradient is computed, only the activations' on the way to the thresholds);
full fine-tuning trains every weight too. Interleaved, median of the timed runs. CPU, random weights.
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
from search.deploy.bench import describe_device, time_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    g = ltmp_core.ViTGeometry.from_model(base)
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * g.depth, [1.0] * g.depth, g, 0.35)
    plan = ltmp_core.make_plan(base, op="merge+prune", keep=keeps)
    x = torch.randn(args.batch_size, 3, *g.img_size)
    y = torch.randint(0, g.num_classes, (args.batch_size,))

    def patched(train_weights: bool):
        model = ltmp_core.apply_plan(copy.deepcopy(base), plan, mode="static")
        ltmp_core.calibrate(model, x)
        ltmp_core.set_mode(model, "soft")
        model.requires_grad_(train_weights)
        for p in ltmp_core.threshold_parameters(model):
            p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step() -> None:
            loss = F.cross_entropy(model(x), y) + 10 * ltmp_core.layer_budget_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, len(params)

    tune, n_tune = patched(False)
    full, n_full = patched(True)
    t_tune, t_full = time_batches([tune, full], torch.device("cpu"), 1, args.runs)
    result = {
        "model": args.model, "device": describe_device(torch.device("cpu")), "batch_size": args.batch_size,
        "tensors_trained_tuning": n_tune, "tensors_trained_full": n_full,
        "s_tuning_step": statistics.median(t_tune), "s_full_step": statistics.median(t_full),
        "tuning_over_full": statistics.median(t_tune) / statistics.median(t_full),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
