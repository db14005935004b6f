"""Data for a study: a tuning split, a held-out split that scores trials, a calibration batch.

The held-out split is carved from the training images with a fixed seed and is class-balanced;
threshold tuning and calibration never see it. The embedded ``digits`` data set is scikit-learn's
bundled 8x8 digits, upscaled: it needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ltmp_core import LTMPError

__all__ = ["Splits", "load_data", "digits"]


@dataclass
class Splits:
    """Tensors of one study's data, already normalised for the model.

    Attributes:
        name: Data set name.
        train_x, train_y: Images and labels that tune thresholds (and train the digits base model).
        holdout_x, holdout_y: Images and labels that score the trials.
        num_classes: Number of classes.
        train_index, holdout_index: Positions of the two splits in the source data set.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    holdout_x: Tensor
    holdout_y: Tensor
    num_classes: int
    train_index: Tensor
    holdout_index: Tensor

    def calibration_batch(self, n: int) -> Tensor:
        """The first ``n`` tuning images (fixed for the study)."""
        return self.train_x[:n]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled tuning batches, forever; the order depends only on ``seed``."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.train_x)
        while True:
            order = torch.randperm(n, generator=g)
            for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = order[i:i + batch_size]
                yield self.train_x[idx], self.train_y[idx]

    def holdout_batches(self, batch_size: int, limit: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """The held-out split in order, in batches (the first ``limit`` images if given)."""
        x, y = self.holdout_x, self.holdout_y
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _balanced_split(y: Tensor, holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, holdout): ``holdout`` images spread evenly over the classes, then shuffled."""
    if not 0 < holdout < len(y):
        raise LTMPError(f"holdout: must be between 1 and {len(y) - 1} for this data set, got {holdout}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per_class = [torch.nonzero(y == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    take = [holdout // len(classes) + (1 if i < holdout % len(classes) else 0) for i in range(len(classes))]
    held = torch.cat([idx[:k] for idx, k in zip(per_class, take)])
    rest = torch.cat([idx[k:] for idx, k in zip(per_class, take)])
    return rest[torch.randperm(len(rest), generator=g)], held[torch.randperm(len(held), generator=g)]


def digits(img_size: int = 32, holdout: int = 360, seed: int = 0) -> Splits:
    """scikit-learn's 1797 bundled 8x8 digits, bilinearly upscaled to ``img_size``, 3 channels in [-1, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.long)
    train, held = _balanced_split(y, holdout, seed)
    return Splits("digits", x[train], y[train], x[held], y[held], num_classes=10, train_index=train, holdout_index=held)


def load_data(name: str, *, img_size: int, holdout: int, seed: int = 0) -> Splits:
    """The splits of data set ``name`` (``digits``)."""
    if name == "digits":
        return digits(img_size=img_size, holdout=holdout, seed=seed)
    raise LTMPError(f"data: unknown data set {name!r}; the embedded one is 'digits'")
