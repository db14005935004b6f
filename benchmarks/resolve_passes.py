"""Forward passes to put trained thresholds back on a FLOPs aim: a solve over the whole range of the
scores against one searched from the thresholds outwards (``calibrate_to_flops(near=RESOLVE_STEP)``).

    python benchmarks/resolve_passes.py [--aims 1.0,0.97,0.9] [--json]

Trains the shipped MNIST model's merge+prune plan at 0.5 of the FLOPs with `search train` (LTMP's recipe,
300 images, as the tests do), then asks the trained thresholds for the aim times each factor, once each
way, on the calibration batch (256 images), and counts the model's forward passes. One row per (factor,
way): ``passes``, the ``ratio`` reached and the ``aim``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import ltmp_core  # noqa: E402
from search.setup.budget import RESOLVE_STEP  # noqa: E402
from search.setup.config import resolve  # noqa: E402
from search.setup.models import ltmp_vit_mnist  # noqa: E402
from search.setup.workbench import Workbench  # noqa: E402


def trained_model(base: torch.nn.Module, work: Path) -> tuple[torch.nn.Module, float]:
    """The shipped model ``base`` with a merge+prune plan at 0.5 trained by `search train`, and its aim."""
    g = ltmp_core.ViTGeometry.from_model(base)
    keeps = ltmp_core.budgets_for_ratio(["merge+prune"] * g.depth, [1.0] * g.depth, g, 0.5)
    plan = ltmp_core.make_plan(base, op="merge+prune", keep=keeps, importance="cls", model_name="ltmp_vit_mnist")
    ltmp_core.save_plan(plan, work / "plan.json")
    subprocess.run([sys.executable, "-m", "search", "train", str(work / "plan.json"), "-o", str(work / "out"),
                    "--train-images", "300", "-b", "50", "--quiet"], check=True, cwd=ROOT)
    _, _, facts = ltmp_core.read_trained(work / "out" / "model.safetensors", weights=False)
    return ltmp_core.load_trained(work / "out" / "model.safetensors", ltmp_vit_mnist(), mode="dynamic"), facts["aim"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aims", default="1.0,0.97,0.9", help="factors of the trained model's aim")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    config = resolve("mnist", {})
    bench = Workbench.open(config)
    calibration = bench.data.calibration_batch(config.calib_images, config.seed)
    unreduced = ltmp_core.unreduced_macs(bench.geometry)
    with tempfile.TemporaryDirectory() as tmp:
        model, aim = trained_model(bench.base, Path(tmp))
    for factor in map(float, args.aims.split(",")):
        for way, near in (("whole range", None), ("near", RESOLVE_STEP)):
            m = copy.deepcopy(model)
            calls: list[int] = []
            m.register_forward_hook(lambda *_: calls.append(1))
            ltmp_core.calibrate_to_flops(m, calibration, aim * factor, near=near)
            passes = len(calls)
            with torch.no_grad():
                m(calibration)
            row = {"factor": factor, "way": way, "passes": passes, "aim": aim * factor,
                   "ratio": float(ltmp_core.image_macs(m).mean()) / unreduced}
            print(json.dumps(row) if args.json else
                  f"aim x{factor:<5} {way:<12} {passes:3d} passes  ratio {row['ratio']:.4f} (aim {row['aim']:.4f})")


if __name__ == "__main__":
    main()
