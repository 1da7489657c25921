"""Datasets for the LeNet experiments: loading, normalizing, augmenting, batching.

Every loader in this package returns the same thing, a :class:`Dataset` whose
images are ``float32`` tensors of shape ``N x C x 32 x 32`` (the input size of
LeNet-5) and whose labels are ``int64`` tensors of shape ``N``.  The images
are prepared the same way whatever the source: zero-padded to 32 x 32, scaled
to [0, 1] and normalized per channel with the *training* images' mean and
standard deviation (:mod:`backmatch_exact.data.dataset` says exactly how).

Sources
-------
``load_default()``
    A class-balanced 10,000 / 2,000 subset of Fashion-MNIST shipped inside the
    package (``backmatch_exact/datasets/fashion_mnist_subset.npz``, MIT
    licence, see ``FASHION_MNIST_LICENSE.txt`` next to it).  Needs no download.
``load_idx_folder(path)``
    Full MNIST or Fashion-MNIST from a folder holding the four standard IDX
    files (raw or ``.gz``).
``load_cifar(path, which=10)`` / ``load_cifar(path, which=100)``
    CIFAR-10 / CIFAR-100 from a folder, in either the binary or the Python
    pickle distribution.  Pickles are read with a restricted unpickler that
    refuses anything but plain containers and numpy arrays.
``load(spec)``
    One entry point that takes a string (``"default"``, a folder, or
    ``"cifar10:PATH"`` and friends) and picks the right loader.

Training helpers
----------------
``augment(x, generator)`` applies random horizontal flips and small random
rotations to a batch; ``batches(n, batch_size, generator)`` yields the index
batches of one epoch.  Both are deterministic given a ``torch.Generator``.

Modules
-------
``formats``   the file formats (IDX, CIFAR binary and pickle), their errors, telling them apart
``dataset``   the :class:`Dataset` container and the preparation every loader shares
``shipped``   the shipped Fashion-MNIST subset (:func:`load_default`)
``batching``  :func:`augment` and :func:`batches`

This module holds the loaders of folders and :func:`load`, and hands on every
public name of the others.

Example::

    import torch
    from backmatch_exact import data

    ds = data.load("default")
    g = torch.Generator().manual_seed(0)
    for idx in data.batches(len(ds.y_train), 128, g):
        x = data.augment(ds.x_train[idx], g)
        y = ds.y_train[idx]
        ...
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .batching import augment, batches
from .dataset import IMAGE_SIZE, Dataset, _make_dataset
from .formats import (
    DataFormatError,
    MissingFilesError,
    PathLike,
    UnsafePickleError,
    _detect,
    _read_cifar_folder_arrays,
    _read_idx_folder_arrays,
    read_idx,
)
from .shipped import load_default

__all__ = [
    "Dataset",
    "DataFormatError",
    "MissingFilesError",
    "UnsafePickleError",
    "IMAGE_SIZE",
    "load",
    "load_default",
    "load_idx_folder",
    "load_cifar",
    "read_idx",
    "augment",
    "batches",
]


# --------------------------------------------------------------------------
# Folders of IDX or CIFAR files
# --------------------------------------------------------------------------


def load_idx_folder(path: PathLike, name: str | None = None, num_classes: int = 10) -> Dataset:
    """Load MNIST or Fashion-MNIST from a folder of IDX files.

    The folder must hold the four standard files, each either raw or gzipped
    (``.gz`` added to the name; the raw file wins if both exist)::

        train-images-idx3-ubyte   train-labels-idx1-ubyte
        t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

    Args:
        path: the folder.
        name: name to give the dataset; defaults to ``"idx:<folder name>"``.
        num_classes: how many classes the labels index (10 for MNIST and
            Fashion-MNIST; say so for another IDX dataset, e.g. 47 for
            EMNIST balanced).

    Returns:
        A 1-channel :class:`Dataset` with ``num_classes`` classes.

    Raises:
        MissingFilesError: some of the four files are absent (all expected
            names and the folder are listed).
        DataFormatError: a file is corrupt or truncated (see :func:`read_idx`),
            image and label counts disagree, or a label is not in
            ``0 .. num_classes-1`` (the message names the file and the label).
    """
    folder = Path(path).expanduser()
    a = _read_idx_folder_arrays(folder, num_classes)
    return _make_dataset(
        name or f"idx:{folder.resolve().name}",
        a["train_images"][:, None],
        a["train_labels"].astype(np.int64),
        a["test_images"][:, None],
        a["test_labels"].astype(np.int64),
        num_classes=num_classes,
    )


def load_cifar(path: PathLike, which: int = 10, *, check_sizes: bool = True) -> Dataset:
    """Load CIFAR-10 or CIFAR-100 from a folder.

    Both official distributions are understood:

    * binary: ``cifar-10-batches-bin/data_batch_1.bin .. data_batch_5.bin,
      test_batch.bin`` (records of 1 label byte + 3072 pixel bytes), or
      ``cifar-100-binary/train.bin, test.bin`` (records of a coarse and a fine
      label byte + 3072 pixel bytes; the *fine* label, 0..99, is used);
    * python: ``cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch``
      or ``cifar-100-python/train, test`` (pickled dicts with ``b'data'`` and
      ``b'labels'`` / ``b'fine_labels'``).  They are read with a restricted
      unpickler that only admits numpy arrays and builtin containers, so a
      tampered file cannot run code; it raises :class:`UnsafePickleError`.

    ``path`` may be the folder holding the files or its parent holding the
    standard sub-folder (``cifar-10-batches-bin`` etc.).  If both the binary
    and the python version are present, the binary one is used.

    Args:
        path: the folder.
        which: 10 or 100.
        check_sizes: also require the official record counts (10,000 per
            CIFAR-10 batch; 50,000 / 10,000 for CIFAR-100 train / test).  Turn
            it off for hand-made miniature copies.  Even when off, CIFAR-10
            training batches must all hold the same number of records.

    Returns:
        A 3-channel :class:`Dataset` named ``"cifar10"`` or ``"cifar100"``.

    Raises:
        MissingFilesError: files are missing (all expected names and the
            folders searched are listed).
        DataFormatError: a truncated or malformed file (named in the message).
        UnsafePickleError: a pickle refers to anything beyond numpy arrays and
            builtin containers.
    """
    a = _read_cifar_folder_arrays(path, which, check_sizes)
    return _make_dataset(f"cifar{which}", a["train_images"], a["train_labels"], a["test_images"],
                         a["test_labels"], num_classes=which)


# --------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------


_PREFIXES = {"cifar10", "cifar100", "fashion", "mnist", "idx", "default"}


def load(spec: str | os.PathLike = "default", **kwargs) -> Dataset:
    """Load a dataset from a short specification string.

    Accepted forms:

    ``"default"``
        The shipped Fashion-MNIST subset (:func:`load_default`).  To load a
        *folder* called ``default``, write ``"./default"``.
    ``"fashion:PATH"``, ``"mnist:PATH"``, ``"idx:PATH"``
        IDX files in folder PATH (:func:`load_idx_folder`); the prefix only
        sets the dataset name (``"fashion-mnist"``, ``"mnist"``,
        ``"idx:<folder>"``).
    ``"cifar10:PATH"``, ``"cifar100:PATH"``
        CIFAR in folder PATH, binary or python version (:func:`load_cifar`).
    ``"PATH"`` (no known prefix)
        A folder; its contents decide: the IDX file names mean MNIST-style,
        ``data_batch_*`` files (or a ``cifar-10-*`` sub-folder) mean CIFAR-10,
        ``train``/``test`` (``.bin``) files (or a ``cifar-100-*`` sub-folder)
        mean CIFAR-100.

    Extra keyword arguments go to the chosen loader (e.g.
    ``check_sizes=False`` for :func:`load_cifar`).

    Returns:
        A :class:`Dataset` (see the module docstring for its layout).
    """
    spec = os.fspath(spec)
    prefix, sep, rest = spec.partition(":")
    if spec == "default":
        return load_default(**kwargs)
    if sep and prefix.lower() in _PREFIXES and prefix.lower() != "default":
        kind, folder = prefix.lower(), Path(rest).expanduser()
    else:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise MissingFilesError(
                f"dataset spec {spec!r} is neither 'default', a known "
                f"'prefix:PATH' (prefixes: cifar10, cifar100, fashion, mnist, idx) "
                f"nor an existing folder"
            )
        kind = _detect(folder)
    if kind == "fashion":
        return load_idx_folder(folder, name="fashion-mnist", **kwargs)
    if kind == "mnist":
        return load_idx_folder(folder, name="mnist", **kwargs)
    if kind == "idx":
        return load_idx_folder(folder, **kwargs)
    return load_cifar(folder, which=100 if kind == "cifar100" else 10, **kwargs)
