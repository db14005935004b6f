"""Compare three FLOP counts of a stock and a patched DeiT-S: ours, PyTorch's, torch-pruning's.

    python benchmarks/flops_counters.py

All figures in GMACs (PyTorch's FLOP count halved, with the release-independent SDPA formula of
tests/flop_reference.py). Random weights; one 224 px image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import torch_pruning as tp

import ltmp_core

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.flop_reference import counted_macs as pytorch_macs, versions  # noqa: E402  (SDPA counted on every torch)


def main() -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    for label, plan in [("stock", None), ("merge+prune keep=0.8", ltmp_core.make_plan(model, op="merge+prune", keep=0.8))]:
        if plan is not None:
            ltmp_core.apply_plan(model, plan, mode="static")
        tp_macs, _ = tp.utils.count_ops_and_params(model, x)
        rows.append((label, ltmp_core.count_flops(model), pytorch_macs(model, x), tp_macs))
    print(versions())
    print(f"{'model':<24}{'ltmp_core':>12}{'pytorch/2':>12}{'torch-pruning':>15}")
    for label, ours, pt, tpm in rows:
        print(f"{label:<24}{ours / 1e9:>12.3f}{pt / 1e9:>12.3f}{tpm / 1e9:>15.3f}")


if __name__ == "__main__":
    main()
