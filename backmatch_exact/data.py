"""Datasets for the LeNet experiments: loading, normalizing, augmenting, batching.

Every loader in this module returns the same thing, a :class:`Dataset` whose
images are ``float32`` tensors of shape ``N x C x 32 x 32`` (the input size of
LeNet-5) and whose labels are ``int64`` tensors of shape ``N``.  The images are
prepared the same way whatever the source:

1. pixels (``uint8``, 0..255) are zero-padded to 32 x 32 if they are smaller
   (28 x 28 MNIST-style images get a 2-pixel black border, which matches their
   black background; CIFAR images are 32 x 32 already);
2. they are scaled to [0, 1];
3. each channel is normalized with the mean and standard deviation of the
   *training* images (padding included), so that ``x_train`` has per-channel
   mean 0 and standard deviation 1.  The same statistics are applied to
   ``x_test`` and kept in ``Dataset.mean`` / ``Dataset.std``.

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

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

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

PathLike = Union[str, "os.PathLike[str]"]

#: Side length of every image a loader returns (LeNet-5 takes 32 x 32 inputs).
IMAGE_SIZE = 32

_DEFAULT_NPZ = "fashion_mnist_subset.npz"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class DataFormatError(ValueError):
    """A data file exists but its contents are not what the format says
    (bad magic number, truncated file, wrong shape, label out of range...).
    The message names the file."""


class MissingFilesError(FileNotFoundError):
    """Some files a loader needs are not there.  The message lists every file
    that was expected and every folder that was searched."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a Python object that a CIFAR pickle never needs
    (for example ``os.system``); it was refused before anything ran.
    The message names the refused ``module.name``."""


# --------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# The shipped Fashion-MNIST subset
# --------------------------------------------------------------------------


def _default_npz_path() -> Path:
    return Path(__file__).resolve().parent / "datasets" / _DEFAULT_NPZ


def load_default() -> Dataset:
    """Load the Fashion-MNIST subset that ships with the package.

    10,000 training images (1,000 per class) and 2,000 test images (200 per
    class), 1 channel, prepared as described in the module docstring.  The
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


# --------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------

#: IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    """Whole contents of ``path``, transparently un-gzipped if it ends in .gz."""
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (EOFError, OSError, zlib.error) as e:
            raise DataFormatError(f"{path}: cannot decompress gzip data ({e})") from e
    return path.read_bytes()


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``) into a numpy array.

    The IDX format (used by MNIST and Fashion-MNIST) is a 4-byte magic number
    ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian ``uint32`` sizes,
    then the data in C order.  The header is validated and the file length
    must match it exactly.

    Args:
        path: the file to read.

    Returns:
        An array of shape given by the header, in native byte order.

    Raises:
        DataFormatError: bad magic number, unknown type code, or a file whose
            length does not match its header (the message gives the expected
            and actual number of bytes).
    """
    path = Path(path)
    raw = _read_bytes(path)
    where = f"{path}" + (" (after gunzip)" if path.suffix == ".gz" else "")
    if len(raw) < 4:
        raise DataFormatError(
            f"{where}: too short for an IDX header ({len(raw)} bytes, need at least 4)"
        )
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(
            f"{where}: bad IDX magic number 0x{raw[:4].hex()} (expected "
            f"0x0000TTDD with type TT in {{08,09,0b,0c,0d,0e}} and DD >= 1 dimensions)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFormatError(
            f"{where}: truncated IDX header: expected {header_len} bytes for "
            f"{ndim} dimensions, file has {len(raw)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFormatError(
            f"{where}: file length does not match its IDX header {dims} of "
            f"{dtype.name}: expected {expected} bytes, actual {len(raw)} bytes"
            + (" (truncated?)" if len(raw) < expected else "")
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_folder_arrays(folder: PathLike) -> dict[str, np.ndarray]:
    """The four IDX arrays of a MNIST-style folder, validated, as numpy."""
    folder = Path(folder).expanduser()
    found = {key: _find_idx_file(folder, stem) for key, stem in _IDX_FILES.items()}
    missing = [stem for key, stem in _IDX_FILES.items() if found[key] is None]
    if missing:
        listing = "\n".join(f"  {s}  (or {s}.gz)" for s in missing)
        expected = "\n".join(f"  {s}  (or {s}.gz)" for s in _IDX_FILES.values())
        raise MissingFilesError(
            f"IDX dataset files missing in folder {folder}:\n{listing}\n"
            f"An IDX dataset folder must hold all of:\n{expected}"
        )
    arrays = {}
    for key, path in found.items():
        arr = read_idx(path)
        want_ndim = 3 if key.endswith("images") else 1
        if arr.ndim != want_ndim or arr.dtype != np.uint8:
            raise DataFormatError(
                f"{path}: expected {want_ndim}-dimensional uint8 data, got "
                f"{arr.ndim}-dimensional {arr.dtype} with shape {arr.shape}"
            )
        arrays[key] = arr
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataFormatError(
                f"{found[split + '_images']} has {n_img} images but "
                f"{found[split + '_labels']} has {n_lab} labels"
            )
    return arrays


def load_idx_folder(path: PathLike, name: str | None = None) -> Dataset:
    """Load MNIST or Fashion-MNIST from a folder of IDX files.

    The folder must hold the four standard files, each either raw or gzipped
    (``.gz`` added to the name; the raw file wins if both exist)::

        train-images-idx3-ubyte   train-labels-idx1-ubyte
        t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

    Args:
        path: the folder.
        name: name to give the dataset; defaults to ``"idx:<folder name>"``.

    Returns:
        A 1-channel :class:`Dataset`; ``num_classes`` is the largest label
        seen plus one (10 for the real MNIST / Fashion-MNIST files).

    Raises:
        MissingFilesError: some of the four files are absent (all expected
            names and the folder are listed).
        DataFormatError: a file is corrupt or truncated (see :func:`read_idx`),
            or image and label counts disagree.
    """
    folder = Path(path).expanduser()
    a = _read_idx_folder_arrays(folder)
    num_classes = int(max(a["train_labels"].max(initial=0), a["test_labels"].max(initial=0))) + 1
    return _make_dataset(
        name or f"idx:{folder.resolve().name}",
        a["train_images"][:, None],
        a["train_labels"].astype(np.int64),
        a["test_images"][:, None],
        a["test_labels"].astype(np.int64),
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------

_CIFAR_PIXELS = 3 * 32 * 32

# Per format: standard sub-folder name, train files, test files, label bytes
# per binary record (CIFAR-100 stores coarse then fine label).
_CIFAR_LAYOUTS = {
    (10, "bin"): ("cifar-10-batches-bin",
                  [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]),
    (10, "py"): ("cifar-10-batches-py",
                 [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    (100, "bin"): ("cifar-100-binary", ["train.bin"], ["test.bin"]),
    (100, "py"): ("cifar-100-python", ["train"], ["test"]),
}

# Record counts of the official files (checked when check_sizes=True).
_CIFAR_STANDARD_COUNTS = {
    10: {"train_file": 10000, "test_file": 10000},
    100: {"train_file": 50000, "test_file": 10000},
}


def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The (module, name) pairs a CIFAR pickle may refer to, resolved to the
    real objects (so numpy 1.x and 2.x spellings both work)."""
    try:  # numpy >= 2
        from numpy._core import multiarray as _ma, numeric as _num
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as _ma, numeric as _num  # type: ignore
    allowed: dict[tuple[str, str], object] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _ma._reconstruct
        allowed[(mod, "scalar")] = _ma.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        # what protocol-5 pickles of arrays use instead of _reconstruct
        if hasattr(_num, "_frombuffer"):
            allowed[(mod, "_frombuffer")] = _num._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for mod in ("builtins", "__builtin__"):  # __builtin__: Python 2 spelling
        for obj in (dict, list, tuple, set, frozenset):
            allowed[(mod, obj.__name__)] = obj
    # Python 3 pickles with protocol <= 2 store bytes as
    # _codecs.encode(str, 'latin1'); admit exactly that and nothing else.
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode`` restricted to latin-1 str -> bytes."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"refusing _codecs.encode with encoding {encoding!r} (only latin1 is needed)"
        )
    return text.encode("latin1", errors)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR pickle needs:
    numpy array / dtype / scalar reconstruction and builtin containers.
    Anything else raises :class:`UnsafePickleError` *before* it is imported
    or called."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle {module}.{name}: a CIFAR "
                f"pickle needs only numpy arrays and builtin containers, so this "
                f"file is not a genuine CIFAR batch (it may be malicious)"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(
            f"{self._source}: refusing persistent id {pid!r} in a CIFAR pickle"
        )


def _load_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError as e:
            if str(path) in str(e):
                raise
            raise UnsafePickleError(f"{path}: {e}") from None
        except Exception as e:  # EOFError, UnpicklingError, ...
            raise DataFormatError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _cifar_pickle_arrays(path: Path, which: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _load_pickle(path)
    label_key = b"labels" if which == 10 else b"fine_labels"
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataFormatError(
            f"{path}: expected a dict with keys b'data' and {label_key!r}, got {keys}"
        )
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DataFormatError(
            f"{path}: b'data' must be uint8 of shape (N, {_CIFAR_PIXELS}), got "
            f"{data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),):
        raise DataFormatError(
            f"{path}: {len(data)} images but {label_key!r} has shape {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_binary_arrays(path: Path, which: int) -> tuple[np.ndarray, np.ndarray]:
    label_bytes = 1 if which == 10 else 2
    record = label_bytes + _CIFAR_PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DataFormatError(
            f"{path}: {raw.size} bytes is not a positive multiple of the "
            f"{record}-byte CIFAR-{which} record ({label_bytes} label byte(s) + "
            f"{_CIFAR_PIXELS} pixels); the file is truncated or not CIFAR-{which}"
        )
    recs = raw.reshape(-1, record)
    labels = recs[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: fine label
    return recs[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _cifar_candidates(folder: Path, which: int) -> list[tuple[str, Path]]:
    """(format, directory) pairs to try, binary first (no unpickling)."""
    out = []
    for fmt in ("bin", "py"):
        sub, train, test = _CIFAR_LAYOUTS[(which, fmt)]
        for d in (folder, folder / sub):
            if any((d / f).is_file() for f in train + test):
                out.append((fmt, d))
    return out


def _cifar_missing_error(folder: Path, which: int, fmt: str | None, d: Path | None):
    if fmt is not None:
        _, train, test = _CIFAR_LAYOUTS[(which, fmt)]
        missing = [f for f in train + test if not (d / f).is_file()]
        return MissingFilesError(
            f"CIFAR-{which} ({'binary' if fmt == 'bin' else 'python pickle'} "
            f"version) files missing in folder {d}: {', '.join(missing)}\n"
            f"Expected all of: {', '.join(train + test)}"
        )
    lines = []
    for f in ("bin", "py"):
        sub, train, test = _CIFAR_LAYOUTS[(which, f)]
        kind = "binary version" if f == "bin" else "python version"
        lines.append(
            f"  {kind}: {', '.join(train + test)}\n"
            f"    in {folder} or in {folder / sub}"
        )
    return MissingFilesError(
        f"no CIFAR-{which} files found; searched {folder} and its sub-folders "
        f"{_CIFAR_LAYOUTS[(which, 'bin')][0]}, {_CIFAR_LAYOUTS[(which, 'py')][0]}.\n"
        f"Expected one of:\n" + "\n".join(lines)
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
    if which not in (10, 100):
        raise ValueError(f"which must be 10 or 100, got {which!r}")
    folder = Path(path).expanduser()
    candidates = _cifar_candidates(folder, which)
    if not candidates:
        raise _cifar_missing_error(folder, which, None, None)
    # Prefer a complete candidate; if none is complete, report the first.
    complete = [
        (fmt, d) for fmt, d in candidates
        if all((d / f).is_file() for f in _CIFAR_LAYOUTS[(which, fmt)][1] + _CIFAR_LAYOUTS[(which, fmt)][2])
    ]
    if not complete:
        fmt, d = candidates[0]
        raise _cifar_missing_error(folder, which, fmt, d)
    fmt, d = complete[0]
    _, train_files, test_files = _CIFAR_LAYOUTS[(which, fmt)]
    reader = _cifar_binary_arrays if fmt == "bin" else _cifar_pickle_arrays

    def read_split(files: Sequence[str], split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            x, y = reader(d / f, which)
            if check_sizes:
                want = _CIFAR_STANDARD_COUNTS[which][f"{split}_file"]
                if len(x) != want:
                    raise DataFormatError(
                        f"{d / f}: {len(x)} records, the official CIFAR-{which} "
                        f"file has {want} (truncated? pass check_sizes=False for "
                        f"a deliberately smaller copy)"
                    )
            xs.append(x)
            ys.append(y)
        counts = [len(x) for x in xs]
        if len(set(counts)) > 1:
            detail = ", ".join(f"{f}: {n}" for f, n in zip(files, counts))
            raise DataFormatError(
                f"CIFAR-{which} {split} files in {d} hold different numbers of "
                f"records ({detail}); one of them is probably truncated"
            )
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = read_split(train_files, "train")
    x_test, y_test = read_split(test_files, "test")
    return _make_dataset(f"cifar{which}", x_train, y_train, x_test, y_test, num_classes=which)


# --------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------

_PREFIXES = {"cifar10", "cifar100", "fashion", "mnist", "idx", "default"}


def _detect(folder: Path) -> str:
    """Guess the kind of dataset stored in ``folder``."""
    if any(_find_idx_file(folder, s) for s in _IDX_FILES.values()):
        return "idx"
    hit100 = bool(_cifar_candidates(folder, 100))
    hit10 = bool(_cifar_candidates(folder, 10))
    if hit10 and not hit100:
        return "cifar10"
    if hit100 and not hit10:
        return "cifar100"
    if hit10 and hit100:
        raise ValueError(
            f"{folder} holds both CIFAR-10 and CIFAR-100 files; say which with "
            f"'cifar10:{folder}' or 'cifar100:{folder}'"
        )
    raise MissingFilesError(
        f"could not recognise a dataset in folder {folder}. Looked for:\n"
        f"  IDX (MNIST / Fashion-MNIST): {', '.join(_IDX_FILES.values())} "
        f"(each raw or .gz)\n"
        f"  CIFAR-10: data_batch_1..5(.bin) + test_batch(.bin), here or in "
        f"cifar-10-batches-bin/ or cifar-10-batches-py/\n"
        f"  CIFAR-100: train(.bin) + test(.bin), here or in cifar-100-binary/ "
        f"or cifar-100-python/"
    )


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


# --------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    flip_p: float = 0.5,
    max_degrees: float = 15.0,
    padding_mode: str = "border",
) -> torch.Tensor:
    """Randomly flip and rotate a batch of images (for training only).

    Each image independently is mirrored left-right with probability
    ``flip_p`` and rotated about its centre by an angle drawn uniformly from
    ``[-max_degrees, max_degrees]`` (bilinear interpolation; pixels that come
    from outside the image copy the nearest edge pixel, which for padded
    MNIST-style images is the background).

    The random numbers come from ``generator`` only, so the same generator
    state gives the same output.  Exactly ``2 * N`` uniform numbers are drawn
    per call (``N`` = batch size), whatever the options.

    Args:
        x: ``N x C x H x W`` float tensor (any device).
        generator: a ``torch.Generator``; the random numbers are drawn on its
            device and moved to ``x``'s device.
        flip_p: probability of a horizontal flip.
        max_degrees: largest rotation, in degrees; 0 disables rotation.
        padding_mode: ``grid_sample`` padding mode (``"border"``,
            ``"zeros"`` or ``"reflection"``).

    Returns:
        A new tensor with the shape, dtype and device of ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"augment expects N x C x H x W, got shape {tuple(x.shape)}")
    n = x.shape[0]
    gen_device = generator.device
    u = torch.rand(2, n, generator=generator, device=gen_device, dtype=torch.float64)
    u = u.to(x.device)
    flip = u[0] < flip_p
    out = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    if max_degrees:
        angle = (u[1] * 2.0 - 1.0) * math.radians(max_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        # affine_grid maps output coords to input coords in [-1, 1] units;
        # for non-square images the aspect ratio must be accounted for.
        h, w = x.shape[-2:]
        ar = w / h
        theta = torch.stack(
            [
                torch.stack([cos, -sin / ar, zero], dim=1),
                torch.stack([sin * ar, cos, zero], dim=1),
            ],
            dim=1,
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode=padding_mode,
                            align_corners=False)
    return out


def batches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the index batches of one pass over ``n`` examples.

    With a ``generator`` the order is a random permutation drawn from it
    (``torch.randperm``), so the same generator state gives the same batches;
    with ``generator=None`` the order is ``0, 1, ..., n-1`` (for evaluation).

    Args:
        n: number of examples.
        batch_size: examples per batch; the last batch may be smaller.
        generator: source of randomness, or ``None`` for sequential order.
        drop_last: skip a final batch smaller than ``batch_size``.

    Yields:
        ``int64`` CPU tensors of indices, usable as ``x[idx]``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if generator is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
