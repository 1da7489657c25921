"""Regenerate the Fashion-MNIST subset shipped with backmatch_exact.

Usage (from the repository root)::

    python validation/make_fashion_subset.py SRC_FOLDER \
        [--out backmatch_exact/datasets/fashion_mnist_subset.npz] \
        [--train-per-class 1000] [--test-per-class 200]

SRC_FOLDER holds the four official Fashion-MNIST IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, raw or ``.gz``), for
example Debian's package::

    apt-get download dataset-fashion-mnist
    dpkg -x dataset-fashion-mnist_*.deb /tmp/fmnist
    python validation/make_fashion_subset.py /tmp/fmnist/usr/share/datasets/fashion-mnist

Selection rule (deterministic, no random numbers involved): for every class
0..9, keep the FIRST ``--train-per-class`` images of that class in the order
of the official training file, and the first ``--test-per-class`` of the
official test file.  The kept images stay in their original relative order
(so classes remain interleaved as in the source).  The official files are
already in random order, so this is an unbiased sample.

Output: ``np.savez_compressed`` with ``x_train`` (uint8, N x 28 x 28),
``y_train`` (int64, N), ``x_test``, ``y_test``.  The script prints a SHA-256
of the array contents (not of the .npz file, whose zip timestamps vary), so a
regenerated file can be compared with the shipped one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backmatch_exact.data.formats import _read_idx_folder_arrays  # noqa: E402

DEFAULT_OUT = REPO / "backmatch_exact" / "datasets" / "fashion_mnist_subset.npz"


def first_n_per_class(labels: np.ndarray, n: int, num_classes: int = 10) -> np.ndarray:
    """Sorted indices of the first ``n`` occurrences of each class."""
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise SystemExit(f"class {c} has only {len(idx)} examples, need {n}")
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep))


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the arrays."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    args = p.parse_args(argv)

    a = _read_idx_folder_arrays(args.src)
    tr = first_n_per_class(a["train_labels"], args.train_per_class)
    te = first_n_per_class(a["test_labels"], args.test_per_class)
    arrays = {
        "x_train": a["train_images"][tr].astype(np.uint8),
        "y_train": a["train_labels"][tr].astype(np.int64),
        "x_test": a["test_images"][te].astype(np.uint8),
        "y_test": a["test_labels"][te].astype(np.int64),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    for k, v in arrays.items():
        print(f"{k}: {v.dtype} {v.shape}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    print(f"content sha256: {content_digest(arrays)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
