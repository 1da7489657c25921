"""The Fashion-MNIST subset shipped inside the package: a dataset that needs no download.

A class-balanced 10,000 / 2,000 subset of Fashion-MNIST, stored as
``backmatch_exact/datasets/fashion_mnist_subset.npz`` (MIT licence, see
``FASHION_MNIST_LICENSE.txt`` next to it; ``validation/make_fashion_subset.py``
cut it from the official files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import Dataset, _make_dataset
from .formats import MissingFilesError

_DEFAULT_NPZ = "fashion_mnist_subset.npz"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _default_npz_path() -> Path:
    return Path(__file__).resolve().parent.parent / "datasets" / _DEFAULT_NPZ


def load_default() -> Dataset:
    """Load the Fashion-MNIST subset that ships with the package.

    10,000 training images (1,000 per class) and 2,000 test images (200 per
    class), 1 channel, prepared as every dataset is (:mod:`backmatch_exact.data.dataset`).  The
    subset was cut from the official Fashion-MNIST files by
    ``validation/make_fashion_subset.py``; ``FASHION_MNIST_LICENSE.txt`` in
    ``backmatch_exact/datasets`` says exactly how.

    Returns:
        A :class:`Dataset` named ``"fashion-mnist-subset"`` with
        ``num_classes == 10`` and ``in_channels == 1``.
    """
    path = _default_npz_path()
    if not path.is_file():
        raise MissingFilesError(
            f"the shipped dataset is missing: expected {path.name} in "
            f"{path.parent} (regenerate it with validation/make_fashion_subset.py)"
        )
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return _make_dataset(
        "fashion-mnist-subset",
        arrays["x_train"][:, None],
        arrays["y_train"].astype(np.int64),
        arrays["x_test"][:, None],
        arrays["y_test"].astype(np.int64),
        num_classes=10,
    )
