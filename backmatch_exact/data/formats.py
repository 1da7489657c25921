"""File formats the datasets come in: IDX (MNIST, Fashion-MNIST), CIFAR binary and CIFAR pickle.

The readers here turn files into validated numpy arrays (``uint8`` images,
integer labels) and nothing more; :mod:`backmatch_exact.data.dataset` turns
those into a normalized :class:`~backmatch_exact.data.Dataset`.

* IDX: :func:`read_idx` reads one file (raw or ``.gz``), checking its header
  against its length; :func:`_read_idx_folder_arrays` the four files of a
  MNIST-style folder.
* CIFAR-10 / CIFAR-100, in either the binary or the Python pickle
  distribution: :func:`_read_cifar_folder_arrays`.  Pickles are read with a
  restricted unpickler that refuses anything but plain containers and numpy
  arrays (:class:`UnsafePickleError`).
* :func:`_detect` guesses which of these a folder holds.

A file that is there but malformed raises :class:`DataFormatError`; missing
files raise :class:`MissingFilesError` listing what was expected and where.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Sequence, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


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


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Refuse a label outside ``0 .. num_classes-1`` (:class:`DataFormatError` naming the file and the value)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataFormatError(
            f"{path}: label {int(labels[bad[0]])} (at position {int(bad[0])}, one of {bad.size} out of range) "
            f"is not a class index 0..{num_classes - 1} of this {num_classes}-class dataset"
        )


def _read_idx_folder_arrays(folder: PathLike, num_classes: int = 10) -> dict[str, np.ndarray]:
    """The four IDX arrays of a MNIST-style folder, validated (labels in ``0 .. num_classes-1``), as numpy."""
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
        if key.endswith("labels"):
            _check_labels(path, arr, num_classes)
        arrays[key] = arr
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataFormatError(
                f"{found[split + '_images']} has {n_img} images but "
                f"{found[split + '_labels']} has {n_lab} labels"
            )
    return arrays


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
    _check_labels(path, labels, which)
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
    _check_labels(path, labels, which)
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


def _read_cifar_folder_arrays(path: PathLike, which: int, check_sizes: bool = True) -> dict[str, np.ndarray]:
    """The CIFAR-``which`` arrays of a folder, validated, as numpy, under the keys of
    :func:`_read_idx_folder_arrays`: images ``uint8`` ``N x 3 x 32 x 32``, labels ``int64``
    (which files are read, and how: ``backmatch_exact.data.load_cifar``)."""
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
    return {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}


# --------------------------------------------------------------------------
# Which format a folder holds
# --------------------------------------------------------------------------


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
        raise DataFormatError(
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
