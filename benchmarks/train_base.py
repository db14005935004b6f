"""Train a proxy's base model and write it where the package ships it.

    python benchmarks/train_base.py [--preset mnist|mnistm] [--out search/weights] [--check]

Trains ``ltmp_vit_mnist`` on the mnist preset's tune split with its recipe (search/setup/models.py:
AdamW 1e-3, one-cycle, label smoothing 0.1, random shifts of up to 2 px, 60 epochs; about 8 minutes
on 2 cores) and saves it under the name `search run` looks for. The shipped file was made by this
script (seed 0, torch 2.14.1, 2-core Intel Xeon VM): 97.3% on the select split, 97.8% on test.
Seeded training gives the same weights on the same hardware and software; another CPU rounds
differently, so the figures can move by a few tenths. ``--check`` trains into a temporary folder
and compares with the shipped file instead of writing it.

``--preset mnistm`` trains ``ltmp_vit_mnistm`` (the same architecture and recipe) on the MNIST-M
tune split of the second proxy (studies/mnistm.toml; its figures are in that preset and in
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "search" / "weights"))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--preset", default="mnist", choices=("mnist", "mnistm"), help="which proxy's base model")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's base_epochs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LTMP_CACHE"] = tmp  # train here, whatever is cached or shipped
        from search.setup import models
        from search.setup.config import load_preset
        from search.setup.workbench import open_data

        models.weights_dir = lambda: Path(tmp) / "none"  # do not load the shipped file
        config = load_preset(args.preset)
        if args.epochs is not None:
            config = replace(config, base_epochs=args.epochs)
        data = open_data(config, torch.device("cpu"))
        start = time.perf_counter()
        model, info = models.load_base_model(
            config.model, data, img_size=config.img_size, base_epochs=config.base_epochs,
            on_train=lambda e, n, loss: print(f"epoch {e}/{n} loss {loss:.3f} ({time.perf_counter() - start:.0f} s)",
                                              flush=True))
        test = models.accuracy(model, data.test_x, data.test_y)
        print(f"select {info['select_accuracy']:.4f}, test {test:.4f}")
        trained = next(Path(tmp).glob(f"{config.model}-*.pt"))
        target = Path(args.out) / trained.name
        if args.check:
            shipped = torch.load(target, map_location="cpu", weights_only=True)["state_dict"]
            mine = torch.load(trained, map_location="cpu", weights_only=True)["state_dict"]
            worst = max(float((shipped[k] - mine[k]).abs().max()) for k in shipped)
            print(f"largest difference from the shipped weights: {worst:.3g}")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(trained.read_bytes())
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
