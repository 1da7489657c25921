"""The :class:`Dataset` container, and the preparation every loader shares.

Every loader returns a :class:`Dataset` whose images are ``float32`` tensors
of shape ``N x C x 32 x 32`` (the input size of LeNet-5) and whose labels are
``int64`` tensors of shape ``N``.  The images are prepared the same way
whatever the source (:func:`_make_dataset`):

1. pixels (``uint8``, 0..255) are zero-padded to 32 x 32 if they are smaller
   (28 x 28 MNIST-style images get a 2-pixel black border, which matches their
   black background; CIFAR images are 32 x 32 already);
2. they are scaled to [0, 1];
3. each channel is normalized with the mean and standard deviation of the
   *training* images (padding included), so that ``x_train`` has per-channel
   mean 0 and standard deviation 1.  The same statistics are applied to
   ``x_test`` and kept in ``Dataset.mean`` / ``Dataset.std``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .formats import DataFormatError

#: Side length of every image a loader returns (LeNet-5 takes 32 x 32 inputs).
IMAGE_SIZE = 32


@dataclass
class Dataset:
    """A normalized image-classification dataset, ready for training.

    Attributes:
        name: short human-readable name, e.g. ``"fashion-mnist-subset"``.
        x_train: ``float32`` tensor, ``N_train x in_channels x 32 x 32``,
            normalized per channel (see the module docstring).
        y_train: ``int64`` tensor of ``N_train`` class indices in
            ``[0, num_classes)``.
        x_test: ``float32`` tensor, ``N_test x in_channels x 32 x 32``,
            normalized with the *training* statistics.
        y_test: ``int64`` tensor of ``N_test`` class indices.
        num_classes: number of classes (10 for MNIST, Fashion-MNIST and
            CIFAR-10, 100 for CIFAR-100).
        in_channels: 1 for grey-scale images, 3 for colour.
        mean: per-channel mean of the training pixels on the [0, 1] scale,
            subtracted before dividing by ``std``.
        std: per-channel standard deviation of the training pixels on the
            [0, 1] scale.  ``x * std + mean`` (broadcast per channel) undoes
            the normalization.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __repr__(self) -> str:  # the default repr would print whole tensors
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes}, "
            f"in_channels={self.in_channels})"
        )


# --------------------------------------------------------------------------
# Shared preparation: pad, scale, normalize
# --------------------------------------------------------------------------


def _pad_to_size(x: np.ndarray, size: int, what: str) -> np.ndarray:
    """Zero-pad ``uint8`` images ``N x C x H x W`` to ``size x size``, centred
    (an odd leftover pixel goes to the bottom/right)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise DataFormatError(
            f"{what}: images are {h}x{w}, larger than the {size}x{size} this "
            f"package uses; crop or resize them first"
        )
    if (h, w) == (size, size):
        return x
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left))
    return np.pad(x, pad, mode="constant", constant_values=0)


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of ``uint8`` images ``N x C x H x W`` on the
    [0, 1] scale, computed from a 256-bin histogram with integer arithmetic
    (so the result does not depend on summation order or array size)."""
    values = np.arange(256, dtype=np.int64)
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(x[:, c].reshape(-1), minlength=256).astype(np.int64)
        total = int(counts.sum())
        s1 = int((counts * values).sum())
        s2 = int((counts * values * values).sum())
        mean = s1 / total / 255.0
        var_num = s2 * total - s1 * s1  # exact: total^2 * 255^2 * variance
        std = math.sqrt(var_num) / total / 255.0
        means.append(mean)
        stds.append(std if std > 0 else 1.0)  # constant images: leave unscaled
    return tuple(means), tuple(stds)


def _make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    """Turn ``uint8`` image arrays ``N x C x H x W`` and integer label arrays
    into a normalized 32 x 32 :class:`Dataset`."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataFormatError(
                f"{name}: {split} images must be uint8 N x C x H x W, got "
                f"{x.dtype} with shape {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataFormatError(
                f"{name}: {split} has {len(x)} images but labels of shape {y.shape}"
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataFormatError(
                f"{name}: {split} labels must lie in [0, {num_classes}), found "
                f"[{int(y.min())}, {int(y.max())}]"
            )
    if len(x_train) == 0:
        raise DataFormatError(f"{name}: the training set is empty")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataFormatError(
            f"{name}: train images are {x_train.shape[1:]} but test images are "
            f"{x_test.shape[1:]}"
        )
    x_train = _pad_to_size(x_train, IMAGE_SIZE, name)
    x_test = _pad_to_size(x_test, IMAGE_SIZE, name)
    mean, std = _channel_stats(x_train)
    channels = x_train.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
        return t.div_(255.0).sub_(m).div_(s)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return Dataset(
        name=name,
        x_train=to_tensor(x_train),
        y_train=labels(y_train),
        x_test=to_tensor(x_test),
        y_test=labels(y_test),
        num_classes=int(num_classes),
        in_channels=int(channels),
        mean=mean,
        std=std,
    )
